"""Mach return codes and the exceptions that carry them.

Every failure in pymach raises a `MachError` whose `.code` is the Mach return-code name
(``KERN_INVALID_NAME``, ``SEND_TIMED_OUT``, ...). Families get their own subclass, so a
caller can catch all send failures with `SendError`. Numeric values follow Mach 2.5
(``kern_return.h``, ``msg.h``, ``mig_errors.h``); names marked *pymach* are additions for
conditions that Mach 2.5 folded into a vaguer code.

The three timeout codes (``KERN_OPERATION_TIMED_OUT``, ``SEND_TIMED_OUT``,
``RCV_TIMED_OUT``) raise a class that is both its family's and Python's builtin
`TimeoutError`, so ``except TimeoutError`` catches them as ``except MachError`` does.

Invariants: every code name used anywhere in pymach is a key of `RETURN_CODES`;
``MachError(code)`` is always an instance of the class `error_class(code)`.
"""

from __future__ import annotations

RETURN_CODES: dict[str, int] = {
    # kern_return.h
    "KERN_SUCCESS": 0,
    "KERN_INVALID_ADDRESS": 1,
    "KERN_PROTECTION_FAILURE": 2,
    "KERN_NO_SPACE": 3,
    "KERN_INVALID_ARGUMENT": 4,
    "KERN_FAILURE": 5,
    "KERN_RESOURCE_SHORTAGE": 6,
    "KERN_NOT_RECEIVER": 7,
    "KERN_NO_ACCESS": 8,
    "KERN_MEMORY_FAILURE": 9,
    "KERN_MEMORY_ERROR": 10,
    "KERN_NOT_IN_SET": 12,
    "KERN_NAME_EXISTS": 13,
    "KERN_ABORTED": 14,
    "KERN_INVALID_NAME": 15,
    "KERN_INVALID_TASK": 16,
    "KERN_INVALID_RIGHT": 17,
    "KERN_INVALID_VALUE": 18,
    "KERN_INVALID_CAPABILITY": 20,
    "KERN_INVALID_HOST": 22,
    "KERN_TERMINATED": 37,
    "KERN_OPERATION_TIMED_OUT": 49,  # Mach 3: a wait for a task or thread timed out
    # msg.h: send
    "SEND_SUCCESS": 0,
    "SEND_INVALID_MEMORY": -101,
    "SEND_INVALID_PORT": -102,
    "SEND_TIMED_OUT": -103,
    "SEND_KERNEL_REFUSED": -107,
    "SEND_INTERRUPTED": -108,
    "SEND_MSG_TOO_LARGE": -109,
    "SEND_MSG_TOO_SMALL": -110,
    "SEND_INVALID_TYPE": -112,  # pymach: a malformed typed item
    "SEND_INVALID_RIGHT": -113,  # pymach: an item names a right the sender lacks
    # pymach (Mach 3 MACH_SEND_NO_BUFFER; Mach 2.5's -105 is SEND_WILL_NOTIFY): the
    # sender's queued out-of-line memory would exceed the kernel's ool_queued_max
    "SEND_NO_BUFFER": -114,
    # msg.h: receive
    "RCV_SUCCESS": 0,
    "RCV_INVALID_MEMORY": -201,
    "RCV_INVALID_PORT": -202,
    "RCV_TIMED_OUT": -203,
    "RCV_TOO_LARGE": -204,
    "RCV_NOT_ENOUGH_MEMORY": -205,
    "RCV_INTERRUPTED": -207,
    "RCV_PORT_CHANGE": -208,
    # pymach (Mach 3 MACH_MSG_IPC_SPACE): the message's rights need more names than the
    # receiver's space may hold (port_names_max); the message stays queued
    "RCV_IPC_SPACE": -209,
    # mig_errors.h
    "MIG_TYPE_ERROR": -300,
    "MIG_REPLY_MISMATCH": -301,
    "MIG_REMOTE_ERROR": -302,
    "MIG_BAD_ID": -303,
    "MIG_BAD_ARGUMENTS": -304,
    "MIG_NO_REPLY": -305,
    "MIG_ARRAY_TOO_LARGE": -307,
    "MIG_SERVER_DIED": -308,
}

_NAME_BY_VALUE: dict[int, str] = {}
for _name, _value in RETURN_CODES.items():
    _NAME_BY_VALUE.setdefault(_value, _name)


class MachError(Exception):
    """A Mach call failed; `.code` is the return-code name, `.value` its number."""

    def __init__(self, code: str, detail: str = "") -> None:
        if code not in RETURN_CODES:
            raise ValueError(f"unknown Mach return code {code!r}")
        self.code = code
        self.value = RETURN_CODES[code]
        self.detail = detail
        text = f"{code}: {detail}" if detail else code
        super().__init__(text)
        self.args = (text,)  # (OSError, a base of the timeout classes, ignores __init__ args)

    def __new__(cls, code: str, detail: str = "") -> MachError:
        """Pick the code's own class (a timeout) or its family's, when that is a subclass
        of the class raised: ``MachError("RCV_TIMED_OUT")`` is an `RcvTimeoutError`."""
        own = error_class(code) if isinstance(code, str) else cls
        target = own if issubclass(own, cls) else cls
        if issubclass(target, OSError):  # a timeout: its C base must make the object
            return OSError.__new__(target)
        return super().__new__(target)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (MachError, (self.code, self.detail))


class KernError(MachError):
    """A KERN_* failure: bad arguments, names, rights, tasks."""


class SendError(MachError):
    """A SEND_* failure of msg_send or the send half of msg_rpc."""


class RcvError(MachError):
    """An RCV_* failure of msg_receive or the receive half of msg_rpc."""


class MigError(MachError):
    """A MIG_* failure: a malformed request or reply of an interface routine."""


class KernTimeoutError(KernError, TimeoutError):
    """KERN_OPERATION_TIMED_OUT: a wait for a task (`.result`, `.wait`) timed out."""


class SendTimeoutError(SendError, TimeoutError):
    """SEND_TIMED_OUT: a send with SEND_TIMEOUT found the queue full until its timeout."""


class RcvTimeoutError(RcvError, TimeoutError):
    """RCV_TIMED_OUT: a receive with RCV_TIMEOUT found no message until its timeout."""


_CLASS_BY_CODE: dict[str, type[MachError]] = {
    "KERN_OPERATION_TIMED_OUT": KernTimeoutError,
    "SEND_TIMED_OUT": SendTimeoutError,
    "RCV_TIMED_OUT": RcvTimeoutError,
}


def error_class(code: str) -> type[MachError]:
    """The class `MachError(code)` raises: the code's own (the timeouts), else its
    family's from the prefix (`KernError`, `SendError`, `RcvError`, `MigError`)."""
    own = _CLASS_BY_CODE.get(code)
    if own is not None:
        return own
    prefix = code.split("_", 1)[0]
    return {"KERN": KernError, "SEND": SendError, "RCV": RcvError, "MIG": MigError}.get(
        prefix, MachError
    )


def code_name(value: int) -> str:
    """Return the name of a numeric return code (``'KERN_FAILURE'`` if unknown)."""
    return _NAME_BY_VALUE.get(value, "KERN_FAILURE")


class ThreadTerminated(BaseException):
    """Raised inside a thread that was terminated, to unwind it.

    A `BaseException`, so that task code's ``except Exception`` does not swallow it.
    """
