"""The one dispatch point: each backend declares what it supports; the first that fits runs.

A backend is chosen per call from the op's registry, in registration order, skipping those
marked ``default=False`` unless asked for by name (or, with ``default=("cuda", ...)``, unless the
inputs are on one of those devices: a fallback only where nothing compiled runs). When none fits, the error lists every
backend with the reason it declined. Forcing a backend applies the same checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


from ._validate import check_choice


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple                       # device types, e.g. ("cpu",)
    dtypes: tuple                        # supported input dtypes
    run: Callable                        # run(args) -> Tensor
    available: Callable[[], Optional[str]] = lambda: None   # reason it cannot run at all, or None
    check: Callable[[object], Optional[str]] = lambda args: None  # reason it declines these args
    default: object = True               # considered when the caller names no backend: True, False, or
                                         # the device types on which it is (e.g. ("cuda",))

    def is_default_for(self, device_type: str) -> bool:
        return self.default is True or (isinstance(self.default, tuple) and device_type in self.default)

    def decline_reason(self, args) -> Optional[str]:
        reason = self.available()
        if reason:
            return reason
        if args.device.type not in self.devices:
            return f"runs on {'/'.join(self.devices)}, not {args.device.type}"
        if args.dtype not in self.dtypes:
            return f"does not support dtype {str(args.dtype).replace('torch.', '')}"
        return self.check(args)


_REGISTRY: dict[str, list[Backend]] = {}


# The backend chosen for args with the same memo_key(): args types whose backends' checks depend on
# nothing else define memo_key (a hashable of device type, dtype and whatever else the checks read),
# and per-token calls then skip the checks. Only choices that succeeded are kept.
_CHOSEN: dict[tuple, Backend] = {}


def register(op: str, backend: Backend) -> None:
    _REGISTRY.setdefault(op, []).append(backend)
    _CHOSEN.clear()


def backends(op: str) -> list[Backend]:
    return list(_REGISTRY.get(op, []))


def select(op: str, args, backend: Optional[str] = None) -> Backend:
    memo_key = getattr(args, "memo_key", None)
    if memo_key is None:
        return _select(op, args, backend)
    key = (op, backend, memo_key())
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _CHOSEN[key] = _select(op, args, backend)
    return chosen


def _select(op: str, args, backend: Optional[str]) -> Backend:
    candidates = _REGISTRY[op]
    if backend is not None:
        check_choice("backend", backend, tuple(b.name for b in candidates))
        chosen = next(b for b in candidates if b.name == backend)
        reason = chosen.decline_reason(args)
        if reason:
            raise ValueError(f"backend={backend!r} cannot run {op} here: {reason}")
        return chosen
    reasons = []
    for b in candidates:
        # A backend for other devices says so, default or not; one for this device that is not a
        # default here says how to ask for it.
        if args.device.type in b.devices and not b.is_default_for(args.device.type):
            where = f" (by default on {'/'.join(b.default)})" if isinstance(b.default, tuple) else ""
            reasons.append(f"{b.name}: only when asked for with backend={b.name!r}{where}")
            continue
        reason = b.decline_reason(args)
        if reason is None:
            return b
        reasons.append(f"{b.name}: {reason}")
    raise ValueError(f"no backend of {op} supports these inputs ({args.device.type}, "
                     f"{str(args.dtype).replace('torch.', '')}):\n  " + "\n  ".join(reasons))
