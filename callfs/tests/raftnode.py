"""A Raft metadata store in this process, for the contract suite and unit tests."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from callfs.cluster.raft import RaftNode, RaftSettings
from callfs.cluster.service import RaftService, raft_password
from callfs.metadata.raft import RaftMetadataStore

SECRET = "contract-test-internal-secret"


def _no_session() -> aiohttp.ClientSession:
    raise RuntimeError("a one-node group never forwards")


#: A one-node group elects itself after one election timeout: keep it short in tests (pysyncobj
#: wants the election timeout over three heartbeats, so the heartbeat is shortened too).
FAST = {
    "election_min": 0.1,
    "election_max": 0.2,
    "leader_fallback": 0.3,
    "heartbeat": 0.02,
    "tick": 0.005,
}


def one_node_raft_store(data_dir: Path, port: int, **settings: float) -> RaftMetadataStore:
    addr = f"127.0.0.1:{port}"
    settings = {**FAST, **settings}
    node = RaftNode(
        RaftSettings(
            node_id="node-1",
            bind_addr=addr,
            peers=(),
            data_dir=str(data_dir),
            password=raft_password(SECRET),
            **settings,  # type: ignore[arg-type]
        )
    )
    service = RaftService(
        node,
        api_endpoint="http://127.0.0.1:1",
        peer_addrs={},
        peer_endpoints={},
        apply_timeout=10.0,
        forward_timeout=10.0,
        internal_secret=SECRET,
        session=_no_session,
    )
    return RaftMetadataStore(service)
