"""The trap numbers and frame layouts between a task process and machd (the syscall
table's numbering, as GNU Mach's mach/syscall_sw.h; the handlers live in machd/remote.py).

Each op is a frame number with a fixed layout: the typed values it carries, in order
(`SIGNATURES`), checked by `wire.check` before anything acts on them. Numbers below 100
go from a task to machd; from 100 on, from machd to a task.

Connection hellos (the first frame of a connection; nothing else is accepted first):
  HELLO_ATTACH   name str, tid int            + 1 fd: the process's new userfaultfd
  HELLO_THREAD   token bytes, tid int         [+ 1 fd: userfaultfd, for a new process]
  HELLO_CONTROL  token bytes                  + 0 or 2 fds: its stdout, stderr
  HELLO_PING     (nothing)
Traps (on a thread's connection, each answered by one REPLY):
  TASK_SELF .. THREAD_REPLY (nothing)         -> a port name
  MSG_SEND       message, option, timeout     -> None
  MSG_RECEIVE    port, option, timeout, size  -> message
  MSG_RPC        message, option, size, send timeout, receive timeout -> message
  MSG_SEND_RECEIVE  message, port, option, size, send timeout, receive timeout -> message
  FAULT_IN       address, size, access        -> None
  STDIO          cwd, sys.path list, main     + 0 or 2 fds (stdout, stderr) -> None
  MAPPED         batch int                    -> None (machd has armed the batch's ranges)
  PAGER_WINDOW   request port, writes         -> [key, paging offset, size, huge page, 1] + 1 fd:
                 the object's window for its manager (read-write), or None if it has none;
                 `writes` 1: the manager takes write-backs in place (pager_data_write_in_place)
  EXIT           result (any wire value)      (no reply; the connection ends)
  CHANNEL_OPEN   port, reply port             -> [channel id, 2] + 2 fds: the sender's
                 end of a direct channel to the port, its shared page (include/direct.py)
  CHANNEL_ACCEPT port, channel id             -> [sender uid, 3] + 3 fds:
                 the receiver's end, the shared page, the port's doorbell (include/doorbell.py)
  CHANNEL_CLOSE  port, channel id             -> None (machd tears the channel down)
  CHANNEL_BIND   port, channel id, reply port -> the reply port's index on the channel
  CHANNEL_REPLIES port, channel id            -> the receiver's names of the bound ports
  CHANNEL_HOLD   port, channel id, message    -> a token: machd holds the message
  CHANNEL_CLAIM  port, channel id, token, size -> the held message, received
  THREAD_ALERT   (nothing)                    -> [1] + 1 fd: the thread's alert (a doorbell)
  BOUNDARY       (nothing)                    -> None (a kernel boundary: a suspension
                 or termination pending for the thread takes effect)
A reply value that is a list ending in n > 0 for these traps owns the REPLY's last n fds.
On the control connection: DETACH (task -> machd); START_THREAD token, DIE why (machd ->
task).
REPLY: status int (REPLY_OK, REPLY_ERROR, REPLY_TERMINATED), value, error code str,
error detail str, batch int, last batch int, maps list; + the fds the maps name.
A WELCOME is the REPLY to a hello; its value is WELCOME_FIELDS, in order.
"""

from __future__ import annotations

from typing import Any

from pymach.include.message import Message

HELLO_ATTACH, HELLO_THREAD, HELLO_CONTROL, HELLO_PING = 1, 2, 3, 4
TASK_SELF, THREAD_SELF, TASK_NOTIFY, HOST_SELF, THREAD_REPLY = 10, 11, 12, 13, 14
MSG_SEND, MSG_RECEIVE, MSG_RPC, MSG_SEND_RECEIVE = 20, 21, 22, 23
FAULT_IN, STDIO, EXIT, MAPPED, PAGER_WINDOW = 30, 31, 32, 33, 34
DETACH = 40
CHANNEL_OPEN, CHANNEL_ACCEPT, CHANNEL_CLOSE, THREAD_ALERT, BOUNDARY = 50, 51, 52, 53, 54
CHANNEL_BIND, CHANNEL_REPLIES, CHANNEL_HOLD, CHANNEL_CLAIM = 55, 56, 57, 58
REPLY, START_THREAD, DIE = 100, 110, 111

REPLY_OK, REPLY_ERROR, REPLY_TERMINATED = 0, 1, 2
HELLO_MAX_BODY = 64 << 10  # a hello is small: machd buffers no more before it is valid
FAULT_IN_MAX = 1 << 30  # the most one FAULT_IN may cover (memory() splits larger ranges)

# Map instructions inside a REPLY: [kind, start, length, ...]
MAP_FD, MAP_UNMAP, MAP_PROTECT = 1, 2, 3
# MAP_FD:      [1, start, length, fd index, offset, protection, shared (0/1)]
# MAP_UNMAP:   [2, start, length]
# MAP_PROTECT: [3, start, length, protection]
MAP_LAYOUT = {MAP_FD: 7, MAP_UNMAP: 3, MAP_PROTECT: 4}
MAP_FDS_MAX = 12  # MAP_FD instructions (descriptors) in one REPLY at most: a frame
# carries at most wire.MAX_FDS (16), and a trap's own value up to 3 more; the rest
# follow in the replies to the MAPPED traps the process makes as it applies each batch

WELCOME_FIELDS = ("task", "task_name", "thread", "page_size", "code", "code_uid",
                  "task_self", "thread_reply", "control_token")

_ANY = (type(None), bool, int, float, bytes, str, list, Message)

SIGNATURES: dict[int, tuple[Any, ...]] = {
    HELLO_ATTACH: (str, int),
    HELLO_THREAD: (bytes, int),
    HELLO_CONTROL: (bytes,),
    HELLO_PING: (),
    TASK_SELF: (), THREAD_SELF: (), TASK_NOTIFY: (), HOST_SELF: (), THREAD_REPLY: (),
    MSG_SEND: (_ANY,) * 3,  # the kernel's trap functions check these values' types, so
    MSG_RECEIVE: (_ANY,) * 4,  # a wrong one gets the embedded kernel's own error
    MSG_RPC: (_ANY,) * 5,
    MSG_SEND_RECEIVE: (_ANY,) * 6,
    FAULT_IN: (int, int, int),
    STDIO: (str, list, str),
    MAPPED: (int,),
    PAGER_WINDOW: (int, int),
    EXIT: (_ANY,),
    DETACH: (),
    CHANNEL_OPEN: (int, int),
    CHANNEL_ACCEPT: (int, int),
    CHANNEL_CLOSE: (int, int),
    CHANNEL_BIND: (int, int, int),
    CHANNEL_REPLIES: (int, int),
    CHANNEL_HOLD: (int, int, _ANY),  # (the message is checked as msg_send checks it)
    CHANNEL_CLAIM: (int, int, int, _ANY),
    THREAD_ALERT: (),
    BOUNDARY: (),
    REPLY: (int, _ANY, str, str, int, int, list),
    START_THREAD: (bytes,),
    DIE: (str,),
}

NAMES = {HELLO_ATTACH: "hello_attach", HELLO_THREAD: "hello_thread",
         HELLO_CONTROL: "hello_control", HELLO_PING: "ping", TASK_SELF: "task_self",
         THREAD_SELF: "thread_self", TASK_NOTIFY: "task_notify", HOST_SELF: "host_self",
         THREAD_REPLY: "thread_reply", MSG_SEND: "msg_send", MSG_RECEIVE: "msg_receive",
         MSG_RPC: "msg_rpc", MSG_SEND_RECEIVE: "msg_send_receive", FAULT_IN: "fault_in",
         STDIO: "stdio", EXIT: "exit", PAGER_WINDOW: "pager_window",
         MAPPED: "mapped", DETACH: "detach", CHANNEL_OPEN: "channel_open",
         CHANNEL_ACCEPT: "channel_accept", CHANNEL_CLOSE: "channel_close",
         THREAD_ALERT: "thread_alert", BOUNDARY: "boundary", CHANNEL_BIND: "channel_bind",
         CHANNEL_REPLIES: "channel_replies", CHANNEL_HOLD: "channel_hold",
         CHANNEL_CLAIM: "channel_claim", REPLY: "reply",
         START_THREAD: "start_thread", DIE: "die"}
