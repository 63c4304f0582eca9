#!/usr/bin/env python3
"""A libtorrent DHT node on 127.0.0.1, driven line by line, for interop tests of the Mainline DHT adapter.

libtorrent is an implementation of BEP 5 that nobody on this project wrote, so a test that has it find our
announces (and has our adapter walk the network through it) checks our wire behaviour against the real thing
rather than against our own assumptions.

Protocol (one command per stdin line, one JSON object per stdout line):

    at start                      -> {"event": "listening", "port": P}        (the DHT's UDP port)
    add_node HOST PORT            -> {"event": "ok", "cmd": "add_node"}
    announce INFOHASH_HEX PORT    -> {"event": "ok", "cmd": "announce"}
    get_peers INFOHASH_HEX        -> {"event": "ok", "cmd": "get_peers"}, later, when the lookup ends:
                                     {"event": "peers", "info_hash": HEX, "peers": ["IP:PORT", ...]}
    status                        -> {"event": "status", "dht_running": bool, "routing_table_nodes": N}
    quit                          -> {"event": "bye"} and exit
    anything unparsable           -> {"event": "error", "cmd": ..., "message": ...}

With LIBTORRENT_NODE_DEBUG=1 in its environment it copies libtorrent's DHT log and packets to stderr.

It never contacts anything but 127.0.0.1: no default DHT routers, no LSD/UPnP/NAT-PMP, and it only listens on
the loopback address. It exits when stdin closes, so a test that dies cannot leave it behind for long.
"""

import json
import os
import queue
import sys
import threading

import libtorrent as lt


def emit(event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def make_session():
    settings = {
        "listen_interfaces": "127.0.0.1:0",
        "enable_dht": True,
        # Only the nodes the test adds: never the public routers.
        "dht_bootstrap_nodes": "",
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        # Every node of the test shares 127.0.0.1: the per-IP limits would keep all but one of them out of
        # the routing table and out of lookups, and rate-limit them as one noisy host.
        "dht_restrict_routing_ips": False,
        "dht_restrict_search_ips": False,
        "dht_block_ratelimit": 100000,
        "dht_upload_rate_limit": 10_000_000,
        # Loopback counts as "dark internet" and unverifiable node ids for libtorrent's defaults.
        "dht_ignore_dark_internet": False,
        "dht_prefer_verified_node_ids": False,
        "alert_mask": lt.alert.category_t.all_categories,
    }
    return lt.session(settings)


def wait_for_listen_port(session):
    """The UDP socket the DHT uses is the listen socket: its port is known once libtorrent reports it."""
    for _ in range(100):
        session.wait_for_alert(100)
        for alert in session.pop_alerts():
            if isinstance(alert, lt.listen_failed_alert):
                raise RuntimeError(f"libtorrent could not listen: {alert.message()}")
        if session.is_listening() and session.listen_port() != 0:
            return session.listen_port()
    raise RuntimeError("libtorrent did not start listening within 10 s")


def read_commands(commands):
    for line in sys.stdin:
        commands.put(line.strip())
    commands.put(None)  # stdin closed: the test is gone


def handle_command(session, line):
    """Runs one command; returns False when the program should exit."""
    words = line.split()
    if not words:
        return True
    cmd = words[0]
    try:
        if cmd == "add_node" and len(words) == 3:
            session.add_dht_node((words[1], int(words[2])))
            emit({"event": "ok", "cmd": cmd})
        elif cmd == "announce" and len(words) == 3:
            session.dht_announce(lt.sha1_hash(bytes.fromhex(words[1])), int(words[2]), 0)
            emit({"event": "ok", "cmd": cmd})
        elif cmd == "get_peers" and len(words) == 2:
            session.dht_get_peers(lt.sha1_hash(bytes.fromhex(words[1])))
            emit({"event": "ok", "cmd": cmd})
        elif cmd == "status" and len(words) == 1:
            # The reply comes with the dht_stats_alert (see pump_alerts).
            session.post_dht_stats()
        elif cmd == "quit":
            emit({"event": "bye"})
            return False
        else:
            emit({"event": "error", "cmd": cmd, "message": f"unknown command or wrong arguments: {line!r}"})
    except Exception as error:  # a bad argument must not kill the node the test still talks to
        emit({"event": "error", "cmd": cmd, "message": str(error)})
    return True


# LIBTORRENT_NODE_DEBUG=1 copies libtorrent's own DHT log to stderr, to see why it ignores or drops nodes.
DEBUG = os.environ.get("LIBTORRENT_NODE_DEBUG") == "1"


def pump_alerts(session):
    for alert in session.pop_alerts():
        if DEBUG and isinstance(alert, (lt.dht_log_alert, lt.dht_pkt_alert)):
            sys.stderr.write(f"libtorrent: {alert.message()}\n")
        if isinstance(alert, lt.dht_get_peers_reply_alert):
            peers = [f"{host}:{port}" for host, port in alert.peers()]
            emit({"event": "peers", "info_hash": str(alert.info_hash), "peers": peers})
        elif isinstance(alert, lt.dht_stats_alert):
            live_nodes = sum(bucket["num_nodes"] for bucket in alert.routing_table)
            emit({"event": "status", "dht_running": session.is_dht_running(), "routing_table_nodes": live_nodes})


def main():
    session = make_session()
    emit({"event": "listening", "port": wait_for_listen_port(session)})

    commands = queue.Queue()
    threading.Thread(target=read_commands, args=(commands,), daemon=True).start()

    while True:
        session.wait_for_alert(50)
        pump_alerts(session)
        try:
            while True:
                line = commands.get_nowait()
                if line is None or not handle_command(session, line):
                    return
        except queue.Empty:
            pass


if __name__ == "__main__":
    main()
