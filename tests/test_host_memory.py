"""The steady host heap (efficientllava/host_memory.py): checked values, what it does on glibc, and its errors."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from efficientllava import host_memory
from efficientllava.host_memory import HostMemoryError, check_threshold, steady_heap
from efficientllava.search.settings import SettingsError, read_settings

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# In a child process (mallopt is process-wide): how many bytes glibc holds in mmapped blocks after allocating 8 MiB.
# The module is loaded by its path, not through the package, so no earlier import (torch) has moved glibc's dynamic
# threshold before the default case allocates.
PROBE = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("host_memory", "efficientllava/host_memory.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
steady_heap = module.steady_heap
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
print(steady_heap(int(sys.argv[1])))
before = libc.mallinfo2().hblkhd
block = libc.malloc(8 << 20)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.parametrize("value", [None, 0, 1, 32])
def test_thresholds_in_range_are_accepted(value):
    check_threshold(value)


@pytest.mark.parametrize("value", [33, -1, True, False, 1.5, "32"])
def test_bad_thresholds_name_the_value_and_the_range(value):
    with pytest.raises(HostMemoryError, match=rf"is {value!r} MiB; expected an integer from 1 to 32"):
        check_threshold(value)
    with pytest.raises(HostMemoryError):
        steady_heap(value)


def test_none_and_zero_leave_the_allocator_alone():
    assert steady_heap(None) == steady_heap(0) == "allocator left alone"


@pytest.mark.skipif(not GLIBC, reason="mallopt thresholds are glibc's")
@pytest.mark.parametrize("mib, mapped", [(0, True), (16, False)])
def test_a_steady_heap_keeps_a_large_block_off_mmap(mib, mapped):
    out = subprocess.run([sys.executable, "-c", PROBE, str(mib)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split("\n")
    assert ("steady heap" in out[0]) == (mib > 0)
    grew = int(out[1])
    assert (grew >= 8 << 20) if mapped else grew == 0  # glibc's default maps an 8 MiB block; the steady heap not


def test_without_glibc_it_says_so(monkeypatch):
    monkeypatch.setattr(host_memory, "_libc", lambda: None)
    assert steady_heap(8) == "allocator left alone (no glibc mallopt on this system)"


def test_a_refused_mallopt_is_an_error(monkeypatch):
    class Refusing:
        @staticmethod
        def mallopt(param, value):
            return 0

    monkeypatch.setattr(host_memory, "_libc", lambda: Refusing())
    with pytest.raises(HostMemoryError, match="glibc refused mallopt"):
        steady_heap(8)


def test_the_search_config_sets_and_checks_it():
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        assert read_settings(compose("search")).steady_heap_mib == 32
        assert read_settings(compose("search", overrides=["steady_heap_mib=null"])).steady_heap_mib is None
        with pytest.raises(SettingsError, match=r"steady_heap_mib is 64; expected an integer from 1 to 32"):
            read_settings(compose("search", overrides=["steady_heap_mib=64"]))
