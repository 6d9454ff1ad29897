"""Farthest point sampling in one call: a Triton kernel for CUDA tensors and a compiled C++ loop for CPU tensors.

Both run the greedy loop of ``depthg.sampling.farthest_point_sample`` (that function chooses the backend and
documents the contract) with the same arithmetic as its torch and NumPy loops, so all backends return
identical indices for finite points: the squared distance is ``(dx*dx + dy*dy) + dz*dz`` rounded after every
operation in the points' dtype (float32 or float64; no fused multiply-add: ``-ffp-contract=off`` for the C++
loop, ``enable_fp_fusion=False`` for Triton), the running minimum is kept per point, chosen points hold
``-inf`` so they are never picked again, and ties go to the lowest index.

- ``fps_triton``: one program per batch item holds all N points in registers and runs all ``n - 1``
  iterations inside a single launch (N up to ``TRITON_MAX_POINTS``). On a CPU it runs only under Triton's
  interpreter (``TRITON_INTERPRET=1`` set before this module is imported), which the tests use to check it.
- ``fps_compiled``: the C++ loop below, vectorised with GCC vector extensions, built at first use with the
  system C++ compiler (``$CXX``, else ``c++``/``g++``; ``-march=native`` when it compiles, and then the CPU
  is part of the cache key) and loaded with ctypes. The shared library is cached in ``kernel_cache_dir()``:
  ``$DEPTHG_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/depthg/kernels``, else ``~/.cache/depthg/kernels``, one
  file per source/compiler/CPU hash, written atomically so concurrent processes may build at once. If the
  build fails, ``fps_compiled`` returns None after logging one warning and the caller uses the NumPy loop.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch build comes without Triton
    triton = None

log = logging.getLogger(__name__)

TRITON_MAX_POINTS = 16384  # all points of an item live in one program's registers
TRITON_OPTIONS = {"enable_fp_fusion": False}  # no fused multiply-add: the CPU loops' rounding, op by op
DTYPES = (torch.float32, torch.float64)

# ----------------------------------------------------------------------------- Triton (CUDA)
if triton is not None:
    @triton.jit
    def _fps_kernel(points_ptr, start_ptr, out_ptr, num, n_pick, BLOCK: tl.constexpr):
        """Program b: greedy FPS over the ``num`` points of item b ([num,3] row-major) -> out[b, :n_pick]."""
        item = tl.program_id(0).to(tl.int64)
        base = points_ptr + item * num * 3
        offs = tl.arange(0, BLOCK)
        valid = offs < num
        x = tl.load(base + offs * 3, mask=valid, other=0.0)
        y = tl.load(base + offs * 3 + 1, mask=valid, other=0.0)
        z = tl.load(base + offs * 3 + 2, mask=valid, other=0.0)
        neg_inf = tl.full([BLOCK], float("-inf"), x.dtype)
        # padding lanes and chosen points hold -inf: never the maximum while an unchosen point is left
        min_d = tl.where(valid, tl.full([BLOCK], float("inf"), x.dtype), neg_inf)
        far = tl.load(start_ptr + item).to(tl.int32)
        out = out_ptr + item * n_pick
        tl.store(out, far.to(tl.int64))
        min_d = tl.where(offs == far, neg_inf, min_d)
        for k in range(1, n_pick):
            cx = tl.load(base + far * 3)
            cy = tl.load(base + far * 3 + 1)
            cz = tl.load(base + far * 3 + 2)
            dx = x - cx
            dy = y - cy
            dz = z - cz
            d = dx * dx + dy * dy
            d = d + dz * dz
            min_d = tl.minimum(min_d, d)
            far = tl.argmax(min_d, axis=0, tie_break_left=True).to(tl.int32)
            tl.store(out + k, far.to(tl.int64))
            min_d = tl.where(offs == far, neg_inf, min_d)


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU with its interpreter (``TRITON_INTERPRET=1``)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older releases read the variable directly
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def triton_supports(points: torch.Tensor) -> bool:
    """Whether ``fps_triton`` can run on ``points`` [B,N,3] (CUDA or the interpreter, float32/64, N small enough)."""
    on_device = points.device.type == "cuda" or (points.device.type == "cpu" and triton_interpreting())
    return triton is not None and on_device and points.dtype in DTYPES and points.shape[1] <= TRITON_MAX_POINTS


def triton_num_warps(block: int) -> int:
    """Warps per program for ``block`` points (about 8 points per thread, 1 to 16 warps)."""
    return min(16, max(1, block // 256))


def fps_triton(points: torch.Tensor, n: int, start: torch.Tensor) -> torch.Tensor:
    """FPS of ``n`` of the N points of each item of ``points`` [B,N,3], starting at ``start`` [B] -> [B,n] long."""
    if not triton_supports(points):
        raise ValueError(f"farthest_point_sample: the triton backend needs Triton and float32/float64 CUDA points "
                         f"with N <= {TRITON_MAX_POINTS} (on a CPU only under TRITON_INTERPRET=1, for tests); got "
                         f"{points.dtype} {points.device.type} points, N={points.shape[1]}, "
                         f"triton {'missing' if triton is None else 'present'}")
    b, num, _ = points.shape
    points = points.detach().contiguous()
    start = start.to(device=points.device, dtype=torch.long).contiguous()
    out = torch.empty((b, n), dtype=torch.long, device=points.device)
    if b == 0:
        return out
    block = max(32, triton.next_power_of_2(num))
    on_cuda = points.device.type == "cuda"
    with torch.cuda.device(points.device) if on_cuda else contextlib.nullcontext():
        _fps_kernel[(b,)](points, start, out, num, n, BLOCK=block, num_warps=triton_num_warps(block),
                          **TRITON_OPTIONS)
    return out


# ----------------------------------------------------------------------------- compiled loop (CPU)
_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

// L points per vector: 32-byte vectors with AVX, 16-byte vectors otherwise (SSE2, NEON).
#if defined(__AVX__)
#define VBYTES 32
#else
#define VBYTES 16
#endif

template <typename T, typename I>
static int fps_batch(const T* points, int64_t b, int64_t num, int64_t n, const int64_t* start, int64_t* out) {
    enum { L = VBYTES / sizeof(T) };
    typedef T V __attribute__((vector_size(VBYTES)));
    typedef I VI __attribute__((vector_size(VBYTES)));
    const int64_t padded = (num + L - 1) / L * L;
    T* buf = (T*)aligned_alloc(64, (4 * padded * sizeof(T) + 63) / 64 * 64);
    if (!buf) return 1;
    T *x = buf, *y = buf + padded, *z = buf + 2 * padded, *md = buf + 3 * padded;  // planes + running min
    const T inf = (T)INFINITY;
    VI lane;
    for (int l = 0; l < L; ++l) lane[l] = (I)l;
    for (int64_t item = 0; item < b; ++item) {
        const T* p = points + item * num * 3;
        for (int64_t i = 0; i < num; ++i) { x[i] = p[3 * i]; y[i] = p[3 * i + 1]; z[i] = p[3 * i + 2]; md[i] = inf; }
        for (int64_t i = num; i < padded; ++i) { x[i] = 0; y[i] = 0; z[i] = 0; md[i] = -inf; }  // never chosen
        int64_t far = start[item];
        int64_t* o = out + item * n;
        o[0] = far;
        md[far] = -inf;  // chosen points hold -inf: min(-inf, d) stays -inf
        for (int64_t k = 1; k < n; ++k) {
            const T cx = x[far], cy = y[far], cz = z[far];
            V best = (V){} - inf;  // per lane: the first maximum seen (strict >) and its index
            VI arg = (VI){}, idx = lane;
            for (int64_t i = 0; i < padded; i += L) {
                V dx = *(V*)(x + i) - cx, dy = *(V*)(y + i) - cy, dz = *(V*)(z + i) - cz;
                V d = dx * dx + dy * dy;  // rounded after every op: built with -ffp-contract=off
                d = d + dz * dz;
                V m = *(V*)(md + i);
                m = d < m ? d : m;
                *(V*)(md + i) = m;
                VI gt = m > best;
                best = gt ? m : best;
                arg = gt ? idx : arg;
                idx += (I)L;
            }
            T bv = best[0];
            I bi = arg[0];
            for (int l = 1; l < L; ++l)  // across lanes: the largest value, ties to the lowest index
                if (best[l] > bv || (best[l] == bv && arg[l] < bi)) { bv = best[l]; bi = arg[l]; }
            far = (int64_t)bi;
            o[k] = far;
            md[far] = -inf;
        }
    }
    free(buf);
    return 0;
}

extern "C" int depthg_fps_f32(const float* p, int64_t b, int64_t num, int64_t n, const int64_t* s, int64_t* o) {
    return fps_batch<float, int32_t>(p, b, num, n, s, o);
}
extern "C" int depthg_fps_f64(const double* p, int64_t b, int64_t num, int64_t n, const int64_t* s, int64_t* o) {
    return fps_batch<double, int64_t>(p, b, num, n, s, o);
}
"""
_FLAGS = ["-O3", "-std=c++11", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"]
_lock = threading.Lock()


def kernel_cache_dir() -> str:
    """Where compiled kernels are cached (``$DEPTHG_KERNEL_CACHE`` or ``$XDG_CACHE_HOME``/``~/.cache`` + depthg/kernels)."""
    explicit = os.environ.get("DEPTHG_KERNEL_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "depthg", "kernels")


def _compiler() -> str:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"


def _cpu_identity() -> str:
    """The CPU model and feature flags (a ``-march=native`` build must not be reused on another CPU)."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh.read().splitlines() if ln.split(":")[0].strip() in ("model name", "flags",
                                                                                          "Features")]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(cxx: str, flags: list[str], target: str) -> str | None:
    """Compile ``_SOURCE`` into ``target`` (atomically); None on success, else the compiler's complaint."""
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    src = tmp[:-3] + ".cpp"
    try:
        with open(src, "w") as fh:
            fh.write(_SOURCE)
        proc = subprocess.run([cxx, *flags, src, "-o", tmp], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip()[-2000:] or f"exit status {proc.returncode}"
        os.replace(tmp, target)
        return None
    finally:
        for path in (src, tmp):
            if os.path.exists(path):
                os.remove(path)


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    for name in ("depthg_fps_f32", "depthg_fps_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_void_p]
        fn.restype = ctypes.c_int
    return lib


def _build() -> ctypes.CDLL:
    cxx = _compiler()
    errors = []
    for extra in (["-march=native"], []):  # native first (AVX on x86), else the compiler's default target
        flags = _FLAGS + extra
        key = "\n".join([_SOURCE, cxx, " ".join(flags), platform.machine(), _cpu_identity() if extra else ""])
        target = os.path.join(kernel_cache_dir(), f"fps-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so")
        if not os.path.exists(target):
            error = _compile(cxx, flags, target)
            if error is not None:
                errors.append(f"{cxx} {' '.join(flags)}: {error}")
                continue
        return _load(target)
    raise RuntimeError("\n".join(errors))


@functools.lru_cache(maxsize=None)
def compiled_library() -> ctypes.CDLL | None:
    """The compiled FPS loop (built at first use, then cached on disk), or None after one logged warning."""
    with _lock:
        try:
            return _build()
        except Exception as exc:  # noqa: BLE001 - any failure (no compiler, no writable cache) -> NumPy loop
            log.warning("farthest_point_sample: could not build the compiled FPS loop (cache %s, set "
                        "DEPTHG_KERNEL_CACHE or CXX to change); using the NumPy loop. %s", kernel_cache_dir(), exc)
            return None


def fps_compiled(points: torch.Tensor, n: int, start: torch.Tensor) -> torch.Tensor | None:
    """FPS of ``n`` of the N points of each item of CPU ``points`` [B,N,3] (float32/64) from ``start`` [B] (long,
    in range; the caller checks) -> [B,n] long, or None when the loop could not be built."""
    if points.device.type != "cpu" or points.dtype not in DTYPES:
        raise ValueError(f"farthest_point_sample: the compiled backend needs float32/float64 CPU points, got "
                         f"{points.dtype} on {points.device.type}")
    lib = compiled_library()
    if lib is None:
        return None
    b, num, _ = points.shape
    points = points.detach().contiguous()
    start = start.to(dtype=torch.long).contiguous()
    out = torch.empty((b, n), dtype=torch.long)
    fn = lib.depthg_fps_f32 if points.dtype == torch.float32 else lib.depthg_fps_f64
    if fn(points.data_ptr(), b, num, n, start.data_ptr(), out.data_ptr()) != 0:
        raise MemoryError(f"farthest_point_sample: the compiled loop could not allocate {4 * num} floats")
    return out
