"""Replicas at different sites over a hivemind DHT on loopback (sync.transport=hivemind): real DHT nodes, real
averagers, real torchrun groups; no mocks."""
import json
import os
import signal
import socket
import subprocess
import threading
import uuid

import pytest
import torch

from config import ConfigError, WanConfig, load_config
from dist.comm import CROSS, Comm
from launch.cluster import free_port
from metrics import read_jsonl, read_log
from tests.faults import fault_env
from tests.procs import ROOT, run, torchrun_cmd, train_cmd
from tests.test_bad_input import one_line_error


def in_threads(fns) -> list:
    """Run the calls at once (each peer blocks in its averaging round until the group forms)."""
    out = [None] * len(fns)
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fns[i]())) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_site_peers_agree_to_the_bit(tmp_path):
    """DiLoCo's mean over three sites is the same bits everywhere (fp32 and 16-bit wire); NoLoCo's pair mean."""
    from optim.wan import SitePeer, start_dht
    wan = WanConfig(run_id=f"t{uuid.uuid4().hex[:8]}", host="127.0.0.1", startup_s=60, matchmaking_s=2)
    first = start_dht(wan, [], 0, None)
    dhts = [first, *(start_dht(wan, [str(a) for a in first.get_visible_maddrs()], 0, None) for _ in range(2))]
    g = torch.Generator().manual_seed(0)
    vecs = [torch.randn(5000, generator=g) * 10.0 ** -k for k in range(3)]  # different scales: rounding matters
    want = sum(vecs) / 3
    try:
        for stage, precision, tol in ((0, "fp32", 1e-6), (1, "bf16", 1e-3)):
            comms = [Comm() for _ in range(3)]
            peers = [SitePeer(d, wan, "diloco", precision, stage, k, 3, 5000, comms[k], str(tmp_path / f"{k}.jsonl"))
                     for k, d in enumerate(dhts)]
            means = in_threads([lambda k=k: peers[k].mean(vecs[k], 7) for k in range(3)])
            assert all(torch.equal(m, means[0]) for m in means), precision
            assert torch.allclose(means[0], want, atol=tol * want.abs().max()), precision
            wire = 4 if precision == "fp32" else 2  # the buffer: 3 rows (one per slot) of 5000 values
            assert [c.bytes_sent[CROSS] for c in comms] == [2 * 2 / 3 * 3 * 5000 * wire] * 3
            for p in peers:
                p.averager.shutdown()
        pair = [SitePeer(d, wan, "noloco", "fp32", 2, k, 2, 5000, Comm(), str(tmp_path / f"n{k}.jsonl"))
                for k, d in enumerate(dhts[:2])]
        means = in_threads([lambda k=k: pair[k].pair_mean(vecs[k], 5) for k in range(2)])
        for m in means:
            assert torch.allclose(m, (vecs[0] + vecs[1]) / 2, atol=1e-6)
        for p in pair:
            p.averager.shutdown()
        assert [r["group"] for r in read_jsonl(str(tmp_path / "n0.jsonl"))] == [[0, 1]]
    finally:
        for d in dhts:
            d.shutdown()


def test_sites_whose_outer_states_differ_take_the_reference_state_when_they_meet(tmp_path):
    """DiLoCo over hivemind: sites that averaged alone (others unreachable) hold different anchors and outer
    momenta when they meet again. The round that meets finds it from their digests and every member takes the
    reference's state: with three sites of which two agree, the majority's (the same bits on all three, within
    rounding of it); with two that differ, the lower slot's (exactly: halving and doubling is exact). A group that
    agrees changes nothing and runs no extra round."""
    from optim.wan import SitePeer, start_dht
    wan = WanConfig(run_id=f"t{uuid.uuid4().hex[:8]}", host="127.0.0.1", startup_s=60, matchmaking_s=2)
    first = start_dht(wan, [], 0, None)
    dhts = [first, *(start_dht(wan, [str(a) for a in first.get_visible_maddrs()], 0, None) for _ in range(2))]
    size = 3000

    def state(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(size, generator=g), torch.randn(size, generator=g) * 1e-3]  # [anchor, momentum]

    vecs = [torch.randn(size, generator=torch.Generator().manual_seed(100 + k)) for k in range(3)]
    peers = [SitePeer(d, wan, "diloco", "fp32", 0, k, 3, size, Comm(), str(tmp_path / f"{k}.jsonl"))
             for k, d in enumerate(dhts)]
    try:
        for step, seeds in ((5, (1, 1, 1)), (10, (2, 3, 3)), (15, (4, 5))):
            outers = [state(seed) for seed in seeds]
            means = in_threads([lambda k=k: peers[k].mean(vecs[k], step, outers[k]) for k in range(len(seeds))])
            assert all(torch.equal(m, means[0]) for m in means)
            for k in range(len(seeds)):
                assert all(torch.equal(a, b) for a, b in zip(outers[k], outers[0])), (step, k)  # the same bits
            reference = state(1 if step == 5 else 3 if step == 10 else 4)
            for got, want in zip(outers[0], reference):
                assert torch.equal(got, want) if step != 10 else torch.allclose(got, want, rtol=1e-6, atol=0)
        records = [r for r in read_jsonl(str(tmp_path / "0.jsonl")) if "resync_from" in r]
        assert [(r["step"], r["resync_from"], r["group"]) for r in records] == [(10, 1, [0, 1, 2]), (15, 0, [0, 1])]
    finally:
        for p in peers:
            p.shutdown()


SITE = ["parallel.replicas=1", "parallel.stages=2", "model.dim=32", "model.n_layers=2", "model.n_heads=2",
        "model.n_kv_heads=1", "data.seq_len=64", "train.batch_size=4", "parallel.microbatches=2", "train.steps=20",
        "log.eval_every=0", "log.log_every=5", "checkpoint.every=0", "log.tensorboard=false", "sync.method=diloco",
        "sync.H=5", "sync.transport=hivemind", "wan.sites=2", "wan.host=127.0.0.1", "wan.startup_s=120",
        "wan.matchmaking_s=3"]


def new_identity(path: str) -> str:
    """A fresh key file for a DHT peer (wan.identity_path) and the peer id it gives."""
    from hivemind.p2p import P2P, PeerID
    P2P.generate_identity(path)
    with open(path, "rb") as fh:
        return str(PeerID.from_identity(fh.read()))


def free_port_pair() -> int:
    """A port p with p and p + 1 free (site 0's two ranks listen on wan.port + rank)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def start_site(args: list[str], out: str, env: dict | None = None) -> subprocess.Popen:
    """A site: one torchrun group in its own process group (so the whole site can be killed at once)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(out + ".out", "w") as fo, open(out + ".err", "w") as fe:
        return subprocess.Popen(torchrun_cmd(2, "train.py", *args), cwd=ROOT, env=env, stdout=fo, stderr=fe,
                                start_new_session=True)


def kill_site(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_two_sites_agree_after_every_outer_step_and_one_survives_the_other(tmp_path, corpus_cache):
    """Sites 0 and 1 (1 replica x 2 stages each) start together and run DiLoCo over hivemind: after outer steps
    5 and 10 each stage's weights are the same bits on both sites. Every rank of site 1 dies in step 12 and its
    whole process group is then SIGKILLed; site 0 goes on alone (outer steps 15 and 20) and finishes."""
    key = str(tmp_path / "site0.key")
    peer_id = new_identity(key)
    port, run_id = free_port_pair(), f"t{uuid.uuid4().hex[:8]}"
    common = [*SITE, f"data.cache_dir={corpus_cache}", f"wan.run_id={run_id}"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    site_a = start_site([*common, "wan.site=0", f"wan.port={port}", f"wan.identity_path={key}", f"log.run_dir={a}"], a)
    site_b = start_site([*common, "wan.site=1", f"wan.initial_peers=[/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}]",
                         f"log.run_dir={b}"], b, env=fault_env("step", step=12))
    try:
        assert site_b.wait(timeout=240) != 0  # its ranks killed themselves
        kill_site(site_b)  # and the rest of the site: torchrun, the DHT nodes, averagers and p2p daemons
        assert site_a.wait(timeout=120) == 0, open(a + ".err").read()[-3000:]
    finally:
        kill_site(site_a)
        kill_site(site_b)
    for stage in (0, 1):
        wan_a = read_jsonl(os.path.join(a, "wan", f"rank{stage}.jsonl"))
        wan_b = read_jsonl(os.path.join(b, "wan", f"rank{stage}.jsonl"))
        assert [(r["step"], r["group"]) for r in wan_a] == [(5, [0, 1]), (10, [0, 1]), (15, [0]), (20, [0])]
        assert [(r["step"], r["group"]) for r in wan_b] == [(5, [0, 1]), (10, [0, 1])]
        sync_a = read_log(os.path.join(a, "sync", f"rank{stage}.jsonl"))
        sync_b = read_log(os.path.join(b, "sync", f"rank{stage}.jsonl"))
        assert [r["step"] for r in sync_a] == [5, 10, 15, 20] and [r["step"] for r in sync_b] == [5, 10]
        assert [r["digest"] for r in sync_a[:2]] == [r["digest"] for r in sync_b], stage  # the same bits
    err = open(a + ".err").read()
    assert "wan: outer step at step 15: averaging alone" in err and "at step 20: averaging alone" in err
    summary = json.load(open(os.path.join(a, "summary.json")))  # written by stage 1: its hivemind bytes
    sent = sum(r["bytes"] for r in read_jsonl(os.path.join(a, "wan", "rank1.jsonl")))
    assert summary["bytes_sent"]["cross_replica"] == sent > 0


@pytest.mark.parametrize("peer,needle", [
    ("127.0.0.1:31337", "is not a peer multiaddr like /ip4/10.0.0.1/tcp/31337/p2p/12D3KooW"),
    ("/ip4/127.0.0.1/tcp/31337", "is not a peer multiaddr"),  # no /p2p/<peer id>
])
def test_malformed_initial_peer_is_refused(peer, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(["sync.method=diloco", "sync.transport=hivemind", "wan.sites=2", "wan.site=1",
                     f"wan.initial_peers=[{peer}]"])


def test_wan_settings_need_the_hivemind_transport():
    with pytest.raises(ConfigError, match="apply to sync.transport=hivemind"):
        load_config(["sync.method=diloco", "wan.sites=2"])
    with pytest.raises(ConfigError, match="set sync.method=diloco or noloco"):
        load_config(["sync.transport=hivemind"])
    with pytest.raises(ConfigError, match="set sync.fragments=1, sync.precision=fp32 or bf16"):
        load_config(["sync.method=diloco", "sync.H=4", "sync.fragments=2", "sync.precision=int8",
                     "sync.transport=hivemind"])


def test_unreachable_initial_peer_is_one_line(tmp_path, corpus_cache):
    nobody = new_identity(str(tmp_path / "nobody.key"))  # a peer id that no running peer has
    proc = run(train_cmd(1, "parallel.replicas=1", "parallel.stages=1", "sync.method=diloco", "sync.transport=hivemind",
                         "wan.sites=2", "wan.site=1", "wan.startup_s=2", f"log.run_dir={tmp_path / 'run'}",
                         f"data.cache_dir={corpus_cache}",
                         f"wan.initial_peers=[/ip4/127.0.0.1/tcp/{free_port_pair()}/p2p/{nobody}]"), check=False)
    line = one_line_error(proc)
    assert "could not start a DHT peer" in line and "site 0 prints it at start-up" in line
