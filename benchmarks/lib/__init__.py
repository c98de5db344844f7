"""The pieces of ``benchmarks/bench_train.py``:

* :mod:`.common`: the device, rank-0 logging, the stock HF attention backends;
* :mod:`.shapes`: model shapes, batches, FLOP counting;
* :mod:`.measure`: timers (collectives, gradient all-reduce), the timed steps, peak memory;
* :mod:`.profiling`: the profiled step's CUDA kernels, the allocator trace at the peak;
* :mod:`.zero3`: the DeepSpeed ZeRO-3 engine and its release between configurations;
* :mod:`.runners`: one runner per system (ulysses_attn, DeepSpeed ALST, no SP);
* :mod:`.step`: one training step; :mod:`.train`: one configuration, then all of them;
* :mod:`.report`: the environment, the table, the JSON.

Imported by the scripts in ``benchmarks/`` (their directory is on ``sys.path`` when run as scripts).
Packages that may touch the GPU (``ulysses_attn``, ``transformers``, ``deepspeed``) are imported
inside the functions, after ``torch.distributed`` is set up, as the script always did.
"""
