"""The one runtime policy: device, what ``amp`` means, memory format, threads, TF32.

Every command (train, evaluate, detect, export, demo), the :class:`~ssd300.inference.Detector`
API and the benchmarks build a :class:`Runtime` with :meth:`Runtime.resolve` and print
:meth:`Runtime.describe`, so the same machine and flags give the same choice everywhere.

``amp`` means:

* CUDA: float16 autocast + GradScaler (training), float16 autocast (inference);
* a CPU with native bf16 (AVX512-BF16 / AMX): bfloat16 autocast, no scaler (bf16 keeps fp32's range);
* any other CPU: fp32, with a one-line note. bf16 is emulated there and 5-10x slower than fp32
  (measured on an AVX2 EPYC), so asking for speed must not make the run slower.

Memory format (one rule, from measurements; see BENCHMARKS.md): channels-last everywhere
except fp32 *training* on a CPU.

* CUDA: channels-last feeds the tensor cores (fp16/TF32).
* Native-bf16 CPU: bf16 channels-last trains at 3.01 img/s vs 1.14 fp32 NCHW (ResNet-50, batch 8),
  oneDNN's bf16 kernels want NHWC.
* fp32 CPU inference: BatchNorm-folded channels-last was the fastest path on AVX2.
* fp32 CPU training: channels-last showed no gain on AVX2 and earlier runs measured oneDNN's NHWC
  backward slower there, so training stays NCHW (also what the exact-resume and DDP tests pin).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ssd300.errors import UserInputError

DeviceLike = Union[str, torch.device, None]

_DTYPE_NAMES = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def resolve_device(device: DeviceLike, field: str = "device") -> torch.device:
    """``None``/""/"auto" -> CUDA when available, else CPU; anything else must be a usable device.
    Errors name ``field`` (the argument or config field that gave ``device``)."""
    if device is None or device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserInputError(f"{field} {device!r}: not a device ({exc})", fields=(field,)) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"{field} {device}: CUDA is not available on this machine; use cpu", fields=(field,))
    if resolved.type not in ("cpu", "cuda"):
        raise UserInputError(f"{field} {device}: only cpu and cuda devices are supported", fields=(field,))
    return resolved


def native_bf16() -> bool:
    """Whether the CPU runs bfloat16 matmuls/convolutions natively (oneDNN's own check).

    oneDNN is the library that runs the bf16 kernels, so its answer is the one that matters
    (it covers AVX512-BF16 and AMX on x86, and works where /proc/cpuinfo does not exist).
    """
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None:
        return False
    try:
        return bool(check())
    except RuntimeError:
        return False


@dataclass(frozen=True)
class Runtime:
    """Where and how the network runs. Build it with :meth:`resolve`, apply it with :meth:`configure`."""

    device: torch.device
    amp_requested: bool
    dtype: Optional[torch.dtype]            # autocast / inference dtype; None = fp32
    native_bf16: bool                        # the CPU's bf16 support (reported even on CUDA)
    channels_last_training: bool
    channels_last_inference: bool
    threads: int                             # torch intra-op threads of this process
    tf32: bool                               # TF32 matmuls/convolutions (CUDA only)

    @classmethod
    def resolve(cls, device: DeviceLike = None, amp: bool = True, *, channels_last: Optional[bool] = None,
                allow_tf32: bool = True, threads: Optional[int] = None,
                bf16_available: Optional[bool] = None) -> "Runtime":
        """The policy for ``device`` (None = auto) and ``amp``; ``channels_last`` overrides the layout
        rule for training and inference alike; ``threads`` sets torch's intra-op threads (default:
        torch's own choice, one per physical core). ``bf16_available`` is for tests."""
        resolved = resolve_device(device)
        has_bf16 = native_bf16() if bf16_available is None else bf16_available
        dtype: Optional[torch.dtype] = None
        if amp and resolved.type == "cuda":
            dtype = torch.float16
        elif amp and resolved.type == "cpu" and has_bf16:
            dtype = torch.bfloat16
        if threads is not None and threads < 1:
            raise UserInputError(f"threads must be >= 1, got {threads}")
        reduced = resolved.type == "cuda" or dtype is not None
        return cls(device=resolved, amp_requested=amp, dtype=dtype, native_bf16=has_bf16,
                   channels_last_training=reduced if channels_last is None else channels_last,
                   channels_last_inference=True if channels_last is None else channels_last,
                   threads=threads or torch.get_num_threads(), tf32=allow_tf32 and resolved.type == "cuda")

    # ------------------------------------------------------------------ decisions

    @property
    def precision(self) -> str:
        """"fp32", "fp16" or "bf16"."""
        return _DTYPE_NAMES[self.dtype]

    @property
    def uses_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.dtype is torch.float16

    @property
    def amp_fell_back(self) -> bool:
        """``amp`` was asked for on a CPU without native bf16 and the run is fp32."""
        return self.amp_requested and self.dtype is None

    def channels_last(self, training: bool) -> bool:
        return self.channels_last_training if training else self.channels_last_inference

    def memory_format(self, training: bool) -> torch.memory_format:
        return torch.channels_last if self.channels_last(training) else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to :attr:`dtype` on :attr:`device` (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> Optional["torch.amp.GradScaler"]:
        """A fresh GradScaler for fp16 training, else None."""
        return torch.amp.GradScaler("cuda") if self.uses_grad_scaler else None

    # ------------------------------------------------------------------ applying and reporting

    def configure(self) -> "Runtime":
        """Apply the process-wide settings: threads, TF32 and cuDNN autotuning (fixed 300x300 input)."""
        if self.threads != torch.get_num_threads():
            torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
            torch.backends.cudnn.benchmark = True
        return self

    def describe(self) -> str:
        """One line naming every choice, the same for every command on the same machine and flags."""
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device) if torch.cuda.is_available() else "cuda"
            where = f"{self.device} ({name}), TF32 {'on' if self.tf32 else 'off'}"
        else:
            capability = torch.backends.cpu.get_cpu_capability()
            where = f"cpu ({capability}, {'native' if self.native_bf16 else 'no native'} bf16)"
        if not self.amp_requested:
            amp = "amp off: fp32"
        elif self.amp_fell_back:
            amp = "amp: fp32 (this CPU has no native bf16; emulated bf16 is 5-10x slower)"
        else:
            amp = f"amp: {self.precision} autocast" + (" + GradScaler" if self.uses_grad_scaler else "")
        layout = _layout_name(self.channels_last_inference)
        if self.channels_last_training != self.channels_last_inference:
            layout = f"{layout} (training {_layout_name(self.channels_last_training)})"
        return f"runtime: {where}, {amp}, {layout}, {self.threads} threads"


def _layout_name(channels_last: bool) -> str:
    return "channels_last" if channels_last else "NCHW"


def usable_cores() -> list[int]:
    """The cores this process may run on, in order: its affinity mask (every core where the
    platform has none)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_workers() -> int:
    """Data-loading processes per rank when not given: one per CPU, at most 8."""
    return min(8, os.cpu_count() or 1)
