"""pymach: the Mach kernel of "The Duality of Memory and Communication" (SOSP 1987) in Python.

Start an embedded kernel with `boot()`; inside it the calling thread is a Mach thread and
every call below works. Names follow the paper; out-parameters are return values.
"""

from __future__ import annotations

__version__ = "0.1.0"

from pymach.errors import (  # noqa: E402
    KernError,
    MachError,
    MigError,
    RcvError,
    SendError,
    ThreadTerminated,
)
from pymach.ipc.ipc_notify import (  # noqa: E402
    NOTIFY_OWNERSHIP_RIGHTS,
    NOTIFY_PORT_DELETED,
    NOTIFY_RECEIVE_RIGHTS,
)
from pymach.ipc.message import (  # noqa: E402
    COPY_SEND,
    MAKE_SEND,
    MOVE_ALL,
    MOVE_OWNERSHIP,
    MOVE_RECEIVE,
    MOVE_SEND,
    MSG_OPTION_NONE,
    MSG_SIZE_MAX,
    OOL,
    PORT_BACKLOG_DEFAULT,
    PORT_BACKLOG_MAX,
    PORT_NULL,
    RCV_TIMEOUT,
    SEND_TIMEOUT,
    Bytes,
    Disposition,
    Float,
    Int,
    IntArray,
    Message,
    Port,
    PortArray,
    Str,
)
from pymach.kern.host import Kernel, TaskHandle, boot  # noqa: E402
from pymach.kern.mach_defs import (  # noqa: E402
    TASK_BOOTSTRAP_PORT,
    TASK_KERNEL_PORT,
    TASK_NOTIFY_PORT,
)
from pymach.kern.mig import Subsystem, serve_message  # noqa: E402
from pymach.mach import (  # noqa: E402
    host_info,
    host_kernel_version,
    host_self,
    msg_receive,
    msg_rpc,
    msg_send,
    port_allocate,
    port_deallocate,
    port_disable,
    port_enable,
    port_messages,
    port_set_backlog,
    port_status,
    task_create,
    task_get_special_port,
    task_info,
    task_notify,
    task_resume,
    task_self,
    task_set_special_port,
    task_suspend,
    task_terminate,
    task_threads,
    thread_create,
    thread_info,
    thread_reply,
    thread_resume,
    thread_self,
    thread_suspend,
    thread_terminate,
)

__all__ = [name for name in dir() if not name.startswith("_")]
