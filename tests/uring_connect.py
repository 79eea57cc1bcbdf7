"""Child process for kernel tests: one TCP connect made through io_uring
(IORING_OP_CONNECT, raw syscalls via ctypes), which never enters the connect() syscall.
argv: host port. Prints {"pid", "res"} (res: 0 or -errno from the completion)."""
import ctypes
import json
import mmap
import os
import socket
import struct
import sys

SYS_io_uring_setup, SYS_io_uring_enter = 425, 426
IORING_OP_CONNECT, IORING_ENTER_GETEVENTS = 16, 1
IORING_OFF_SQ_RING, IORING_OFF_CQ_RING, IORING_OFF_SQES = 0, 0x8000000, 0x10000000


class Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                # io_sqring_offsets: head tail ring_mask ring_entries flags dropped array
                ("sq_off", ctypes.c_uint32 * 8), ("sq_user_addr", ctypes.c_uint64),
                # io_cqring_offsets: head tail ring_mask ring_entries overflow cqes flags
                ("cq_off", ctypes.c_uint32 * 8), ("cq_user_addr", ctypes.c_uint64)]


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    p = Params()
    fd = libc.syscall(SYS_io_uring_setup, 4, ctypes.byref(p))
    if fd < 0:
        sys.exit(f"io_uring_setup: {os.strerror(ctypes.get_errno())}")
    sq_head, sq_tail, sq_mask, _, _, _, sq_array, _ = p.sq_off
    cq_head, cq_tail, cq_mask, _, _, cqes, _, _ = p.cq_off
    sq = mmap.mmap(fd, sq_array + p.sq_entries * 4, offset=IORING_OFF_SQ_RING)
    cq = mmap.mmap(fd, cqes + p.cq_entries * 16, offset=IORING_OFF_CQ_RING)
    sqes = mmap.mmap(fd, p.sq_entries * 64, offset=IORING_OFF_SQES)

    s = socket.socket()
    # sockaddr_in: family in host order, port and address in network order
    sa = struct.pack("=H", socket.AF_INET) + struct.pack("!H4s8x", int(sys.argv[2]),
                                                         socket.inet_aton(sys.argv[1]))
    buf = ctypes.create_string_buffer(sa, len(sa))
    # sqe: opcode, flags, ioprio, fd, off (= addrlen), addr (= sockaddr *), len, op_flags,
    # user_data
    sqes[0:64] = struct.pack("<BBHiQQIIQ24x", IORING_OP_CONNECT, 0, 0, s.fileno(), len(sa),
                             ctypes.addressof(buf), 0, 0, 1)
    tail = struct.unpack_from("<I", sq, sq_tail)[0]
    struct.pack_into("<I", sq, sq_array + (tail & struct.unpack_from("<I", sq, sq_mask)[0]) * 4, 0)
    struct.pack_into("<I", sq, sq_tail, tail + 1)
    if libc.syscall(SYS_io_uring_enter, fd, 1, 1, IORING_ENTER_GETEVENTS, None, 0) < 0:
        sys.exit(f"io_uring_enter: {os.strerror(ctypes.get_errno())}")
    head = struct.unpack_from("<I", cq, cq_head)[0]
    idx = head & struct.unpack_from("<I", cq, cq_mask)[0]
    _, res, _ = struct.unpack_from("<QiI", cq, cqes + idx * 16)
    print(json.dumps({"pid": os.getpid(), "res": res}))


if __name__ == "__main__":
    main()
