# bpf/netmon.h for Cython, declared once: the record, the loader's config and their
# constants. Only what the extension reads or writes is named, so a renamed field is a
# compile error; the C compiler sees the real header.
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "netmon.h" nogil:
    enum:
        NETMON_COMM_LEN
        NETMON_ADDR_LEN
        NETMON_F_TRUNCATED
        NETMON_F_NO_ADDR
        NETMON_F_NO_RESULT
        NETMON_F_INPROGRESS
        NETMON_F_NO_OWNER
        NETMON_DNS_MAX

    enum netmon_kind:
        NETMON_KIND_CONNECT
        NETMON_KIND_UDP_SEND
        NETMON_KIND_TCP_OUTCOME
        NETMON_KIND_ACCEPT

    enum netmon_backend:
        NETMON_BACKEND_SYSCALL
        NETMON_BACKEND_CGROUP

    enum netmon_outcome:
        NETMON_OUTCOME_NONE
        NETMON_OUTCOME_PENDING
        NETMON_OUTCOME_ESTABLISHED
        NETMON_OUTCOME_FAILED

    enum netmon_drop:
        NETMON_DROP_MAX

    enum netmon_inbound:
        NETMON_INBOUND_MAX

    struct netmon_config:
        uint64_t wakeup_bytes
        uint64_t scoped
        uint64_t backend

    struct netmon_listener_key:
        uint32_t net_ns
        uint32_t port

    struct netmon_listener:
        uint64_t sk
        uint64_t cgroup_id
        uint32_t pid
        uint32_t tid
        uint32_t uid
        char comm[NETMON_COMM_LEN]

    struct netmon_event:
        uint64_t ts_ns
        uint64_t cgroup_id
        uint32_t pid
        uint32_t tid
        uint32_t uid
        int32_t ret
        uint32_t net_ns
        uint32_t latency_us
        uint32_t packets
        uint16_t family
        uint16_t port
        uint16_t protocol
        uint16_t src_port
        uint8_t sock_type
        uint8_t flags
        uint8_t kind
        uint8_t backend
        uint8_t outcome
        uint8_t addr_len
        char comm[NETMON_COMM_LEN]
        uint8_t addr[NETMON_ADDR_LEN]
        uint8_t src_addr[16]

    struct netmon_dns:
        uint64_t ts_ns
        uint32_t net_ns
        uint32_t len
        uint16_t family
        uint16_t protocol
