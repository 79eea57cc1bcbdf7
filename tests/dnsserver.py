"""A small authoritative DNS server for the kernel tests (dnspython), UDP and TCP on one
address's port 53, answering from a zone of {name: [(type, ttl, value), ...]} and
following CNAMEs within it. Also runnable in another network namespace: see main()."""
import socket
import struct
import sys
import threading
import time

import dns.message
import dns.rcode
import dns.rrset


class Server:
    def __init__(self, addr: str, zone: dict):
        self.addr, self.zone = addr, zone
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        self.udp = socket.socket(fam, socket.SOCK_DGRAM)
        self.udp.bind((addr, 53))
        self.tcp = socket.socket(fam, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((addr, 53))
        self.tcp.listen(16)
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def answer(self, wire: bytes) -> bytes:
        q = dns.message.from_wire(wire)
        r = dns.message.make_response(q)
        name, rdtype = q.question[0].name, q.question[0].rdtype
        for _ in range(8):  # follow CNAMEs inside the zone
            records = self.zone.get(name.to_text().rstrip(".").lower(), [])
            cname = [rec for rec in records if rec[0] == "CNAME"]
            for typ, ttl, value in cname or [rec for rec in records
                                             if dns.rdatatype.from_text(rec[0]) == rdtype]:
                r.answer.append(dns.rrset.from_text(name, ttl, "IN", typ, value))
            if not cname:
                break
            name = dns.name.from_text(cname[0][2])
        if not r.answer:
            r.set_rcode(dns.rcode.NXDOMAIN)
        return r.to_wire()

    def _serve_udp(self):
        while True:
            try:
                wire, peer = self.udp.recvfrom(4096)
            except OSError:
                return
            try:
                self.udp.sendto(self.answer(wire), peer)
            except Exception:  # not a query we can answer: ignore it, as servers do
                continue

    def _serve_tcp(self):
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                n = struct.unpack("!H", conn.recv(2, socket.MSG_WAITALL))[0]
                wire = conn.recv(n, socket.MSG_WAITALL)
                out = struct.pack("!H", len(wire := self.answer(wire))) + wire
                if dns.message.from_wire(wire).question[0].name.labels[0] != b"split":
                    conn.sendall(out)  # one segment
                    continue
                # as some servers write: the length on its own, then the message in parts
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for part in (out[:2], out[2:20], out[20:]):
                    conn.sendall(part)
                    time.sleep(0.02)  # each its own segment

    def close(self):
        for s in (self.udp, self.tcp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def main(argv):
    """In a fresh network namespace: bring lo up, serve NAME -> IP on 127.0.0.1:53, resolve
    NAME through it (dnspython), connect to IP:PORT (a listener made here), and print
    'net_ns pid'."""
    import os
    import subprocess

    import dns.query
    name, ip = argv
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    server = Server("127.0.0.1", {name: [("A", 60, ip)]})
    listener = socket.socket()
    listener.bind((ip, 0))
    listener.listen(4)
    reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", timeout=2)
    got = reply.answer[0][0].address
    c = socket.create_connection((got, listener.getsockname()[1]), timeout=2)
    c.close()
    server.close()
    print(os.stat("/proc/self/ns/net").st_ino, os.getpid(), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
