"""Benchmarks of the model at guest scale (tools/testing/selftests/kvm/dirty_log_perf_test.c, memstress.c).

* :mod:`kvmsim.bench.prefault`: the host side of a guest's first-touch faults over a range, vectorised
  (``get_user_pages_unlocked()`` → ``handle_mm_fault()`` for fresh anonymous, THP, hugetlb and shmem
  memory), with the counters the scalar path would leave;
* :mod:`kvmsim.bench.memstress`: memslots, vCPU regions and the guest's dirtying pass;
* :mod:`kvmsim.bench.dirty_log_perf`: the dirty_log_perf_test flow, phase timings and cost counters;
* :mod:`kvmsim.bench.real`: the same flow on the real ``/dev/kvm`` through the Backend protocol;
* :mod:`kvmsim.bench.report`: the printed lines, rich tables, JSON and the plot;
* :mod:`kvmsim.bench.replay`: real VMM workloads (QEMU, Cloud Hypervisor, Firecracker, virtio-gpu blobs)
  on the same model paths, with a lost-write oracle (``kvmsim bench replay NAME``).

Benchmarks run with ``Host(recording=False)``: counters only, no per-event facts.
"""
