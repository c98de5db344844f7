"""The collectives of ``ulysses_attn.comm``: all-to-all round trip and gradients, the differentiable
sum and gather, in 4 real processes (gloo) over groups of 4, of 2 (contiguous) and of 2 (strided)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from ulysses_attn.comm import all_gather_seq, all_reduce_sum, gather_heads_scatter_seq, gather_seq_scatter_heads

B, H, S, D = 2, 8, 12, 3
GROUPS = {"p4": [(0, 1, 2, 3)], "p2": [(0, 1), (2, 3)], "p2_strided": [(0, 2), (1, 3)]}


def _tensor(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _seed(members, tag):  # different data in different groups: mixing groups up cannot go unnoticed
    return 1000 * tag + sum(10**i * m for i, m in enumerate(members))


def _comm_worker(rank, world):
    out = {}
    for name, all_members in GROUPS.items():
        handles = [dist.new_group(list(m)) for m in all_members]  # collective: every rank, same order
        ((group, members),) = [(g, m) for g, m in zip(handles, all_members) if rank in m]
        P, r = len(members), members.index(rank)
        s, h = S // P, H // P
        X, W = _tensor(_seed(members, 1), B, H, S, D), _tensor(_seed(members, 2), B, H, S, D)
        Y, V = _tensor(_seed(members, 3), B, H, S, D), _tensor(_seed(members, 4), B, H, S, D)

        # before attention: the model hands over a non-contiguous [B, H, S/P, D] view of [B, S/P, H, D]
        x_bshd = X.transpose(1, 2)[:, r * s : (r + 1) * s].clone().requires_grad_()
        y = gather_seq_scatter_heads(x_bshd.transpose(1, 2), group)
        (torch.sin(y) * W[:, r * h : (r + 1) * h]).sum().backward()
        back = gather_heads_scatter_seq(y.detach(), group)

        # after attention: [B, H/P, S, D] -> [B, H, S/P, D]
        y_local = Y[:, r * h : (r + 1) * h].clone().requires_grad_()
        z = gather_heads_scatter_seq(y_local, group)
        (torch.cos(z) * V[:, :, r * s : (r + 1) * s]).sum().backward()

        # differentiable sum and no-grad gather
        a = torch.tensor([float(r + 1)], dtype=torch.float64, requires_grad=True)
        total = all_reduce_sum(a, group)
        (total * (r + 1)).sum().backward()
        gathered = all_gather_seq(X[:, 0, r * s : (r + 1) * s], group)
        # all_gather_seq is differentiable (per-token outputs): each rank's slice gets the sum of
        # every rank's gradient for it
        xg = X[:, 0, r * s : (r + 1) * s].clone().requires_grad_()
        g = all_gather_seq(xg, group)
        (g * _tensor(_seed(members, 5 + r), B, S, D)).sum().backward()
        gather_grad = xg.grad

        out[name] = dict(
            members=members,
            r=r,
            y=y.detach(),
            x_grad=x_bshd.grad.transpose(1, 2),
            back=back,
            x_local=X[:, :, r * s : (r + 1) * s],
            z=z.detach(),
            y_grad=y_local.grad,
            total=total.item(),
            a_grad=a.grad.item(),
            gathered=gathered,
            gather_grad=gather_grad,
        )
    return out


def _reference_comm(members):
    """What every group rank must hold, computed in one process by concatenating the shards."""
    P = len(members)
    s, h = S // P, H // P
    X, W = _tensor(_seed(members, 1), B, H, S, D), _tensor(_seed(members, 2), B, H, S, D)
    Y, V = _tensor(_seed(members, 3), B, H, S, D), _tensor(_seed(members, 4), B, H, S, D)
    x_shards = [X[:, :, j * s : (j + 1) * s].clone().requires_grad_() for j in range(P)]
    full = torch.cat(x_shards, dim=2)
    ys = [full[:, j * h : (j + 1) * h] for j in range(P)]
    sum((torch.sin(y) * W[:, j * h : (j + 1) * h]).sum() for j, y in enumerate(ys)).backward()
    y_shards = [Y[:, j * h : (j + 1) * h].clone().requires_grad_() for j in range(P)]
    full_y = torch.cat(y_shards, dim=1)
    zs = [full_y[:, :, j * s : (j + 1) * s] for j in range(P)]
    sum((torch.cos(z) * V[:, :, j * s : (j + 1) * s]).sum() for j, z in enumerate(zs)).backward()
    return [
        dict(y=ys[j].detach(), x_grad=x_shards[j].grad, z=zs[j].detach(), y_grad=y_shards[j].grad) for j in range(P)
    ], X[:, 0]


@pytest.mark.timeout(300)  # a regression into a collective hang fails instead of blocking CI
def test_all_to_all_round_trip_and_gradients():
    results = run_distributed(_comm_worker, 4)
    for name, all_members in GROUPS.items():
        for members in all_members:
            refs, x_row = _reference_comm(members)
            P = len(members)
            for rank in members:
                got = results[rank][name]
                r = got["r"]
                assert got["members"] == members and r == members.index(rank)
                ref = refs[r]
                assert got["y"].shape == (B, H // P, S, D)
                assert torch.equal(got["y"], ref["y"]), (name, rank)  # pure data movement: exact
                assert torch.equal(got["back"], got["x_local"]), (name, rank)  # inverse: exact round trip
                torch.testing.assert_close(got["x_grad"], ref["x_grad"], rtol=0, atol=1e-12)
                assert got["z"].shape == (B, H, S // P, D)
                assert torch.equal(got["z"], ref["z"]), (name, rank)
                torch.testing.assert_close(got["y_grad"], ref["y_grad"], rtol=0, atol=1e-12)
                assert got["total"] == P * (P + 1) / 2  # sum of (r + 1) over the group
                assert got["a_grad"] == P * (P + 1) / 2  # d/da_r sum_j (j + 1) * total = sum_j (j + 1)
                assert torch.equal(got["gathered"], x_row)
                s = S // P
                want = sum(_tensor(_seed(members, 5 + j), B, S, D) for j in range(P))[:, r * s : (r + 1) * s]
                torch.testing.assert_close(got["gather_grad"], want, rtol=0, atol=1e-12)
