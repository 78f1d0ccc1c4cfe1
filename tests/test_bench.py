"""The benchmarks run and report consistent figures (small sizes; no timing is checked).

Speed targets are met, or missed, in `pymach bench` runs (README, Benchmarks); these
tests only keep the benchmark code working: every figure is there, positive, and each
ratio is the quotient of the figures it names.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nativeutil import uffd_or_skip


def _ratio_ok(out: dict[str, Any], ratio: str, num: str, den: str) -> None:
    assert out[ratio] == pytest.approx(out[num] / out[den], rel=0.05, abs=0.01)


def test_bench_ipc_command_prints_json_figures_and_ratios() -> None:
    r = subprocess.run([sys.executable, "-m", "pymach.cli.main", "bench", "ipc", "--json",
                        "-n", "200", "--rounds", "2"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["benchmark"] == "ipc" and out["round_trips_per_round"] == 200
    assert min(out["msg_rpc_us"], out["thread_queue_us"], out["socketpair_us"]) > 0
    _ratio_ok(out, "ratio_msg_rpc_vs_socketpair", "msg_rpc_us", "socketpair_us")
    _ratio_ok(out, "ratio_msg_rpc_vs_thread_queue", "msg_rpc_us", "thread_queue_us")
    assert out["target_ratio_at_most"] == 1.5
    assert out["condition_handoff_us"] > 0
    _ratio_ok(out, "ratio_condition_handoff_vs_thread_queue", "condition_handoff_us",
              "thread_queue_us")


def test_bench_command_refuses_what_a_mode_lacks() -> None:
    r = subprocess.run([sys.executable, "-m", "pymach.cli.main", "bench", "pager"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "needs --mode native" in r.stderr


@pytest.mark.slow
def test_bench_vm_and_cache_small() -> None:
    from pymach.bench import cache, vm

    out = vm.run(pages=64, rounds=1, working_set=1 << 20)
    assert out["zero_fill_faults_per_s"] > 0 and out["cow_faults_per_s"] > 0
    assert out["pageouts"] > 0 and out["pageins"] > 0  # the working set did not fit
    c = cache.run(files=2, file_size=8192)
    assert c["mapped_pass2"]["io_operations"] == 0  # the second pass is all cache hits
    assert c["read_calls_pass2"]["io_operations"] == c["read_calls_pass1"]["io_operations"] > 0


@pytest.mark.slow
def test_bench_native_small() -> None:
    uffd_or_skip()
    from pymach.bench import native

    ipc = native.run_ipc(n=50, rounds=1)
    _ratio_ok(ipc, "ratio_msg_rpc_vs_socketpair", "native_msg_rpc_us", "socketpair_us")
    assert ipc["channel_floor_us"] > 0
    _ratio_ok(ipc, "ratio_channel_floor_vs_socketpair", "channel_floor_us", "socketpair_us")
    vm = native.run_vm(size=4 << 20, rounds=1)
    assert min(vm["ool_first_send_ms"], vm["ool_repeat_send_ms"],
               vm["ool_deallocate_send_ms"], vm["receiver_vm_deallocate_ms"]) > 0
    _ratio_ok(vm, "speedup_first_send", "pickle_pipe_ms", "ool_first_send_ms")
    _ratio_ok(vm, "ratio_ool_first_send_vs_mprotect", "ool_first_send_ms", "mprotect_ms")
    _ratio_ok(vm, "ratio_receiver_vm_deallocate_vs_munmap_punch",
              "receiver_vm_deallocate_ms", "munmap_punch_ms")
    _ratio_ok(vm, "ratio_ool_deallocate_send_vs_munmap_punch", "ool_deallocate_send_ms",
              "munmap_punch_ms")
    assert vm["target_ratio_ool_first_send_vs_mprotect_at_most"] == 1.2
    pager = native.run_pager(fault_pages=32, stream_size=4 << 20, fill_size=4 << 20,
                             writeback_size=1 << 20, pressure=(12 << 20, 8 << 20),
                             probe_s=0.3)
    assert min(pager["pager_fault_us"], pager["zero_fill_fault_us"],
               pager["stream_gb_per_s"], pager["mmap_page_cache_gb_per_s"]) > 0
    _ratio_ok(pager, "ratio_pager_fault_vs_naive_uffd", "pager_fault_us",
              "naive_uffd_fault_us")
    if shutil.which("cc") or os.environ.get("CC"):  # the C baseline of the fault
        _ratio_ok(pager, "ratio_pager_fault_vs_c_three_fault", "pager_fault_us",
                  "c_three_fault_us")
        _ratio_ok(pager, "ratio_naive_uffd_fault_vs_c_three_fault", "naive_uffd_fault_us",
                  "c_three_fault_us")
        _ratio_ok(pager, "ratio_stream_vs_c_three_stream", "stream_gb_per_s",
                  "c_three_stream_gb_per_s")
    else:
        assert "C compiler" in pager["c_three_skipped"]
    _ratio_ok(pager, "ratio_zero_fill_fault_vs_memfd_first_touch", "zero_fill_fault_us",
              "memfd_first_touch_us")
    _ratio_ok(pager, "ratio_stream_vs_naive_uffd_stream", "stream_gb_per_s",
              "naive_uffd_stream_gb_per_s")
    _ratio_ok(pager, "ratio_stream_vs_naive_uffd_stream_1024", "stream_gb_per_s",
              "naive_uffd_stream_1024_gb_per_s")
    _ratio_ok(pager, "ratio_stream_no_read_ahead_vs_naive_uffd_stream",
              "stream_no_read_ahead_gb_per_s", "naive_uffd_stream_gb_per_s")
    _ratio_ok(pager, "ratio_numpy_fill_native_vs_anon", "numpy_fill_native_ms",
              "numpy_fill_anon_ms")
    _ratio_ok(pager, "ratio_writeback_vs_msync", "writeback_us_per_page", "msync_us_per_page")
    _ratio_ok(pager, "ratio_pressure_write_vs_pwrite", "pressure_write_us_per_page",
              "swap_file_pwrite_us_per_page")
    _ratio_ok(pager, "ratio_pressure_read_back_vs_pread", "pressure_read_back_us_per_page",
              "swap_file_pread_us_per_page")
    _ratio_ok(pager, "ratio_pager_pressure_write_vs_pwrite",
              "pager_pressure_write_us_per_page", "swap_file_pwrite_us_per_page")
    for when in ("alone", "paging"):  # another task's kernel calls: median <= p99 <= max
        median, p99, most, count = pager[f"kernel_call_{when}_us_median_p99_max_count"]
        assert 0 < median <= p99 <= most and count > 0


# -- the baselines (pymach.bench.baselines) --------------------------------------------
def _positive(x: float) -> None:
    assert isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.parametrize("cluster_pages", [1, 64])
def test_naive_uffd_handler_serves_the_ones_it_writes(cluster_pages: int) -> None:
    uffd_or_skip()
    from pymach.bench.baselines import PAGE, naive_handler

    size = 100 * PAGE + 123  # a partial last block, and a partial last page
    with naive_handler(size, cluster_pages) as view:
        assert view.size == size and bool((view == 1).all())  # every byte, from the handler
        del view


@pytest.fixture(scope="module")
def c_three(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The C baseline program, built (skipped where there is no C compiler, except in
    CI, whose machine has one)."""
    uffd_or_skip()
    from pymach.bench import baselines

    try:
        return baselines.c_three_program(str(tmp_path_factory.mktemp("c_three")))
    except baselines.CBaselineUnavailable as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


@pytest.mark.parametrize("cluster_pages", [1, 64])
def test_c_three_process_handler_serves_the_ones_it_writes(c_three: str,
                                                           cluster_pages: int) -> None:
    from pymach.bench.baselines import PAGE, c_three_handler

    size = 100 * PAGE + 123  # a partial last block, and a partial last page
    with c_three_handler(c_three, size, cluster_pages) as view:
        assert view.size == size and bool((view == 1).all())  # every byte, from its pager
        del view


def test_c_three_process_fault_and_stream_baselines(c_three: str) -> None:
    from pymach.bench import baselines

    _positive(baselines.c_three_fault_us(c_three, 64))  # raises if a page is not all 1s
    _positive(baselines.c_three_stream_gbps(c_three, 4 << 20, 64))


def test_c_baseline_takes_a_compiler_with_its_flags_from_cc(
        c_three: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pymach.bench import baselines

    cc = os.environ.get("CC") or shutil.which("cc")  # (c_three built with it)
    monkeypatch.setenv("CC", f"{cc} -Wall -Werror")  # a compiler and flags, as make's
    program = baselines.c_three_program(str(tmp_path))
    with baselines.c_three_handler(program, 8 * baselines.PAGE) as view:
        assert bool((view == 1).all())
        del view


def test_c_baseline_without_a_working_compiler_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pymach.bench import baselines, native

    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    with pytest.raises(baselines.CBaselineUnavailable, match="false failed"):
        baselines.c_three_program(str(tmp_path))
    assert native.run_c_three(8, 1 << 20) == {"c_three_skipped": "false failed: "}
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))  # one that is not there
    with pytest.raises(baselines.CBaselineUnavailable, match="no-such-cc: No such file"):
        baselines.c_three_program(str(tmp_path))
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # and none at all
    with pytest.raises(baselines.CBaselineUnavailable, match="no C compiler"):
        baselines.c_three_program(str(tmp_path))


def test_naive_uffd_fault_and_stream_baselines() -> None:
    uffd_or_skip()
    from pymach.bench import baselines

    _positive(baselines.naive_uffd_fault_us(64))  # raises if the pages are not all 1s
    _positive(baselines.naive_uffd_stream_gbps(4 << 20, 64))  # likewise for the bytes


def test_kernel_baselines() -> None:
    from pymach.bench import baselines

    _positive(baselines.memfd_first_touch_us(64))
    _positive(baselines.mprotect_ms(4 << 20))
    _positive(baselines.munmap_punch_ms(4 << 20))
    _positive(baselines.numpy_fill_anon_ms(4 << 20))
    _positive(baselines.msync_us_per_page(1 << 20))
    assert all(x > 0 for x in baselines.swap_file_us_per_page(1 << 20))


def test_channel_floor_ends_when_either_side_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """channel_floor_us: each process closes the other's ends, so a server that fails
    ends the client's wait (EOFError), and a client that fails ends the server (no hang:
    the test's own timeout would fire)."""
    import os

    from pymach.bench import baselines

    parent = os.getpid()
    init, take = baselines._ChannelSide.__init__, baselines._ChannelSide.take

    def failing_init(self: Any, rx: Any, tx: Any) -> None:
        if os.getpid() != parent:
            raise OSError(24, "no descriptor (simulated)")
        init(self, rx, tx)

    monkeypatch.setattr(baselines._ChannelSide, "__init__", failing_init)
    with pytest.raises(EOFError):
        baselines.channel_floor_us(50, 1)
    monkeypatch.setattr(baselines._ChannelSide, "__init__", init)
    calls = [0]

    def failing_take(self: Any) -> Any:
        calls[0] += 1
        if os.getpid() == parent and calls[0] == 3:
            raise RuntimeError("the client fails")
        return take(self)

    monkeypatch.setattr(baselines._ChannelSide, "take", failing_take)
    with pytest.raises(RuntimeError):
        baselines.channel_floor_us(50, 1)
