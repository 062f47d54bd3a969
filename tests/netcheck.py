"""Which TCP ports a set of processes listens on, read from /proc (Linux), and whether an
address is loopback: the checks that every Ray the tests or klstore start stays on loopback."""

from __future__ import annotations

import ipaddress
import os
import socket


def socket_inodes(pids) -> dict[str, int]:
    """socket inode -> pid, for every socket the processes hold open."""
    inodes = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[len("socket:[") : -1]] = pid
    return inodes


def _address(hexaddr: str, family: int) -> str:
    raw = bytes.fromhex(hexaddr)
    if family == socket.AF_INET:
        return socket.inet_ntop(family, raw[::-1])
    return socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))


def listening(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in LISTEN state held by the processes."""
    inodes = socket_inodes(pids)
    out = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    hexaddr, hexport = local.split(":")
                    out.append((inodes[inode], _address(hexaddr, family), int(hexport, 16)))
    return sorted(out)


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def process_tree(pid: int) -> list[int]:
    import psutil

    root = psutil.Process(pid)
    return [pid] + [child.pid for child in root.children(recursive=True)]
