"""Child process for kernel tests: names itself (prctl PR_SET_NAME), makes the connects
described in argv[2] (JSON), prints {"pid", "results": [{"tid", "ret", "sport"}]} as JSON
(sport: the local port after a successful inet connect, else null)."""
import ctypes
import json
import socket
import sys
import threading

FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}
TYPES = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM}


def connect(op, out):
    s = socket.socket(FAMILIES[op["family"]], TYPES[op.get("type", "stream")])
    s.setblocking(not op.get("nonblock", False))
    addr = op["addr"] if isinstance(op["addr"], str) else tuple(op["addr"])
    ret = -s.connect_ex(addr)
    # the source the kernel chose (inet): what an event's source_port must say
    sport = s.getsockname()[1] if op["family"] != "unix" and ret == 0 else None
    out.append({"tid": threading.get_native_id(), "ret": ret, "sport": sport})
    s.close()


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME: this thread's comm
    results = []
    for op in json.loads(sys.argv[2]):
        if op.get("thread"):
            def run(op=op):
                libc.prctl(15, sys.argv[1].encode(), 0, 0, 0)
                connect(op, results)
            t = threading.Thread(target=run)
            t.start()
            t.join()
        else:
            for _ in range(op.get("repeat", 1)):
                connect(op, results)
    print(json.dumps({"pid": threading.get_native_id(), "results": results}))


if __name__ == "__main__":
    main()
