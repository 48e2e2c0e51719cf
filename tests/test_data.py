"""Data: tokenizers, corpus loading/caching/splitting, deterministic resumable loader, batches."""
import json
import math
import os

import numpy as np
import pytest
import torch

import data.dataset as dataset_mod
from config import DataConfig
from data.corpus import DataError, is_validation, list_files
from data.dataset import load_corpus
from data.loader import ReplicaLoader, make_batch, validation_batches
from data.tokenizer import ByteTokenizer

SEQ_LEN = 16
VAL_PERCENT = 25.0
TEXT = "héllo wörld — 日本語 🚀 naïve café\nline two\ttab"


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.eos == 256 and tok.vocab_size == 257
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32
    assert len(ids) == len(TEXT.encode("utf-8")) > len(TEXT)  # non-ASCII takes several bytes
    assert ids.min() >= 0 and ids.max() < 256
    assert tok.decode(ids) == TEXT
    assert tok.decode(list(ids) + [tok.eos]) == TEXT  # eos is not text
    assert tok.decode(tok.encode("")) == ""


def test_bpe_tokenizer_round_trip(tmp_path):
    pytest.importorskip("tokenizers")
    from data.tokenizer import BPETokenizer
    texts = [TEXT, "the quick brown fox jumps over the lazy dog " * 5, "def f(x):\n    return x * 2\n" * 4]
    path = str(tmp_path / "bpe.json")
    tok = BPETokenizer.load_or_train(path, texts, 300)
    assert os.path.exists(path)
    assert 257 <= tok.vocab_size <= 300
    assert tok.eos is not None and 0 <= tok.eos < tok.vocab_size
    for t in texts + ["unseen text: ¿qué tal? ✓"]:
        ids = tok.encode(t)
        assert ids.dtype == np.int32 and (ids < tok.vocab_size).all()
        assert tok.decode(ids) == t
    assert len(tok.encode(texts[1])) < len(texts[1].encode())  # merges actually compress
    assert [a.tolist() for a in tok.encode_many(texts)] == [tok.encode(t).tolist() for t in texts]
    again = BPETokenizer.load_or_train(path, [], 300)  # loaded from disk, not retrained
    assert again.vocab_size == tok.vocab_size and again.eos == tok.eos
    assert again.encode(texts[1]).tolist() == tok.encode(texts[1]).tolist()


# ---------------------------------------------------------------- corpus


def _write_corpus(root, n_txt=60, n_records=12):
    """Files with unique marker text; returns [(name, text)] in the order load_corpus reads them."""
    os.makedirs(root, exist_ok=True)
    docs = []
    for i in range(n_txt):
        text = f"<doc{i:03d}>" + "abcdefgh"[i % 8] * (10 + i % 7) + " é\n"
        with open(os.path.join(root, f"doc_{i:03d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        docs.append((f"doc_{i:03d}.txt", text))
    with open(os.path.join(root, "notes.md"), "w") as f:  # ignored: not .txt/.jsonl
        f.write("<ignored>" * 10)
    lines = []
    for j in range(n_records):
        text = f"<rec{j:03d}>" + "xyz"[j % 3] * (12 + j % 5)
        lines.append(json.dumps({"text": text, "id": j}))
        docs.append((f"records.jsonl#{j}", text))
    with open(os.path.join(root, "records.jsonl"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return docs


def _markers(windows):
    text = bytes(int(b) for b in windows.reshape(-1) if b < 256).decode("utf-8", errors="replace")
    found = set()
    for kind in ("doc", "rec"):
        start = 0
        while (k := text.find(f"<{kind}", start)) >= 0:
            end = text.find(">", k)
            if end > 0:
                found.add(text[k:end + 1])
            start = k + 1
    return found


def _marker(name, text):
    return text[: text.index(">") + 1]


@pytest.fixture
def corpus_dir(tmp_path):
    root = str(tmp_path / "corpus")
    docs = _write_corpus(root)
    cfg = DataConfig(source="path", path=root, cache_dir=str(tmp_path / "cache"), seq_len=SEQ_LEN,
                     val_percent=VAL_PERCENT)
    return cfg, docs


def test_load_corpus_windows_split_and_cache(corpus_dir, monkeypatch):
    cfg, docs = corpus_dir
    train_docs = [(n, t) for n, t in docs if not is_validation(n, cfg.val_percent)]
    val_docs = [(n, t) for n, t in docs if is_validation(n, cfg.val_percent)]
    assert train_docs and val_docs, "pick VAL_PERCENT so both splits are non-empty"

    c = load_corpus(cfg)
    assert c.vocab_size == 257 and c.eos == 256
    assert c.train.ndim == 2 and c.train.shape[1] == SEQ_LEN + 1 and len(c.train) > 0
    assert c.val.ndim == 2 and c.val.shape[1] == SEQ_LEN + 1 and len(c.val) > 0
    assert c.n_docs == (len(train_docs), len(val_docs))

    # The exact streams: documents in file order, each followed by eos, cut into whole windows.
    tok = ByteTokenizer()
    for windows, split in ((c.train, train_docs), (c.val, val_docs)):
        stream = np.concatenate([np.append(tok.encode(t), tok.eos) for _, t in split])
        n = len(stream) // (SEQ_LEN + 1)
        assert len(windows) == n
        assert np.array_equal(windows, stream[: n * (SEQ_LEN + 1)].reshape(n, SEQ_LEN + 1))
    assert c.doc_lengths.tolist() == [len(t.encode()) for _, t in train_docs]

    # Validation documents never appear in training windows, and vice versa.
    train_markers = {_marker(n, t) for n, t in train_docs}
    val_markers = {_marker(n, t) for n, t in val_docs}
    assert not train_markers & val_markers
    found_train, found_val = _markers(c.train), _markers(c.val)
    assert found_train and found_val
    assert found_train <= train_markers
    assert found_val <= val_markers
    assert "<ignored>" not in found_train | found_val

    # Unigram entropy of the training stream: positive, below ln(vocab), and the right value.
    full = np.concatenate([np.append(tok.encode(t), tok.eos) for _, t in train_docs])
    p = np.bincount(full) / len(full)
    p = p[p > 0]
    assert 0 < c.unigram_entropy < math.log(c.vocab_size)
    assert c.unigram_entropy == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-9)

    # Second call hits the cache: no documents are read again and the arrays are identical.
    def no_read(*a, **k):
        raise AssertionError("cache miss: documents were read again")
    monkeypatch.setattr(dataset_mod, "read_documents", no_read)
    c2 = load_corpus(cfg)
    assert np.array_equal(c2.train, c.train) and np.array_equal(c2.val, c.val)
    assert c2.n_docs == c.n_docs and c2.unigram_entropy == c.unigram_entropy
    assert sorted(f.split(".", 1)[1] for f in os.listdir(cfg.cache_dir) if f.startswith("tokens-")) == \
        ["json", "lengths.npy", "train.npy", "val.npy"]  # one cache: its arrays and the record written last
    assert isinstance(c2.train, np.memmap) or isinstance(c2.train.base, np.memmap)  # mapped, not read whole


def test_validation_split_is_by_name_and_stable():
    names = [f"doc_{i:04d}.txt" for i in range(2000)]
    for pct in (2.0, 10.0, 50.0):
        share = sum(is_validation(n, pct) for n in names) / len(names)
        assert abs(share - pct / 100) < 0.05
    assert not any(is_validation(n, 0.0) for n in names)
    assert all(is_validation(n, 100.0) for n in names)
    # Raising val_percent only moves documents into validation.
    assert all(is_validation(n, 20.0) for n in names if is_validation(n, 10.0))


def test_list_files_missing_folder(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError) as err:
        list_files("path", missing)
    assert "data.path" in str(err.value) and missing in str(err.value)


def test_list_files_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("not a corpus file")
    with pytest.raises(DataError) as err:
        list_files("path", str(empty))
    assert "data.path" in str(err.value) and str(empty) in str(err.value)


def test_list_files_sorted_and_recursive(tmp_path):
    (tmp_path / "b").mkdir()
    for rel in ("z.txt", "a.jsonl", "b/c.txt", "b/skip.json"):
        (tmp_path / rel).write_text("x")
    root, files = list_files("path", str(tmp_path))
    assert root == str(tmp_path)
    assert [os.path.relpath(f, root) for f in files] == ["a.jsonl", "z.txt", os.path.join("b", "c.txt")]


def test_load_corpus_too_small_raises(tmp_path):
    root = tmp_path / "small"
    root.mkdir()
    (root / "a.txt").write_text("tiny")
    cfg = DataConfig(source="path", path=str(root), cache_dir=str(tmp_path / "cache"), seq_len=SEQ_LEN,
                     val_percent=VAL_PERCENT)
    with pytest.raises(DataError, match="data.seq_len"):
        load_corpus(cfg)


def test_load_corpus_bpe(tmp_path):
    pytest.importorskip("tokenizers")
    root = str(tmp_path / "corpus")
    docs = _write_corpus(root, n_txt=40, n_records=8)
    cfg = DataConfig(source="path", path=root, cache_dir=str(tmp_path / "cache"), seq_len=SEQ_LEN,
                     val_percent=VAL_PERCENT, tokenizer="bpe", bpe_vocab_size=300)
    assert any(is_validation(n, VAL_PERCENT) for n, _ in docs)
    c = load_corpus(cfg)
    assert 257 <= c.vocab_size <= 300
    assert 0 <= c.eos < c.vocab_size
    for w in (c.train, c.val):
        assert w.shape[1] == SEQ_LEN + 1 and len(w) > 0
        assert w.min() >= 0 and w.max() < c.vocab_size
    assert (c.train == c.eos).sum() > 0
    tok_files = [f for f in os.listdir(cfg.cache_dir) if f.startswith("bpe-") and f.endswith(".json")]
    assert len(tok_files) == 1
    from data.tokenizer import BPETokenizer
    tok = BPETokenizer.load_or_train(os.path.join(cfg.cache_dir, tok_files[0]), [], 300)
    assert tok.vocab_size == c.vocab_size and tok.eos == c.eos
    # The training stream decodes back to the training documents, separated at eos.
    train_docs = [t for n, t in docs if not is_validation(n, VAL_PERCENT)]
    stream = c.train.reshape(-1).tolist()
    pieces, cur = [], []
    for i in stream:
        if i == c.eos:
            pieces.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert pieces == train_docs[: len(pieces)] and len(pieces) >= len(train_docs) - 2


def test_corpus_cache_depends_on_tokenizer(tmp_path):
    """A byte corpus and a bpe corpus of the same folder must not share a cache entry."""
    pytest.importorskip("tokenizers")
    root = str(tmp_path / "corpus")
    _write_corpus(root, n_txt=40, n_records=4)
    common = dict(source="path", path=root, cache_dir=str(tmp_path / "cache"), seq_len=SEQ_LEN,
                  val_percent=VAL_PERCENT)
    byte = load_corpus(DataConfig(**common))
    bpe = load_corpus(DataConfig(**common, tokenizer="bpe", bpe_vocab_size=300))
    assert byte.eos == 256 and bpe.eos != 256
    assert len(bpe.train) < len(byte.train)


# ---------------------------------------------------------------- loader


def _windows(n, t=8):
    # Window i holds i in its first column, so contents identify the sample.
    w = np.tile(np.arange(t + 1), (n, 1)) + 1000
    w[:, 0] = np.arange(n)
    return w


def _ids(loader, steps):
    return [loader.sample_ids(s).tolist() for s in steps]


def test_loader_deterministic_and_matches_windows():
    w = _windows(40)
    a = ReplicaLoader(w, eos=999, seed=3, replica=0, replicas=2, batch_size=4)
    b = ReplicaLoader(w, eos=999, seed=3, replica=0, replicas=2, batch_size=4)
    for _ in range(12):  # more than one epoch (5 steps per epoch)
        ba, bb = a.next_batch(), b.next_batch()
        assert ba.sample_ids == bb.sample_ids
        assert torch.equal(ba.inputs, bb.inputs)
        assert ba.inputs[:, 0].tolist() == ba.sample_ids  # the batch holds exactly these windows
        assert torch.equal(ba.inputs, torch.from_numpy(w[ba.sample_ids][:, :-1]))
    assert a.step == 12


def test_loader_replicas_disjoint_and_epoch_covers_once():
    n, replicas, bs = 24, 3, 4
    w = _windows(n)
    loaders = [ReplicaLoader(w, 999, seed=11, replica=r, replicas=replicas, batch_size=bs) for r in range(replicas)]
    steps_per_epoch = n // (replicas * bs)
    for epoch in range(3):
        seen = []
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            per_replica = [set(l.sample_ids(step).tolist()) for l in loaders]
            for i in range(replicas):
                assert len(per_replica[i]) == bs
                for j in range(i + 1, replicas):
                    assert not per_replica[i] & per_replica[j]
            for l in loaders:
                seen += l.sample_ids(step).tolist()
        assert sorted(seen) == list(range(n)), f"epoch {epoch}"
    # Epochs are differently shuffled.
    e0 = [i for l in loaders for i in l.sample_ids(0).tolist()]
    e1 = [i for l in loaders for i in l.sample_ids(steps_per_epoch).tolist()]
    assert e0 != e1


def test_every_sample_is_read_once_per_epoch_across_replica_count_changes():
    """4 replicas, replica 1 out for steps 3-5 (its slot read by another), back at 6; then a resume with 2."""
    n, bs = 4 * 4 * 9, 4
    w = _windows(n)
    loaders = [ReplicaLoader(w, 999, seed=2, replica=r, replicas=4, batch_size=bs) for r in range(4)]
    for loader in loaders:  # every rank records the same changes
        loader.rejoin(3, (0, 2, 3))
        loader.rejoin(6, (0, 1, 2, 3))
    seen = []
    for step in range(9):
        members = (0, 2, 3) if 3 <= step < 6 else (0, 1, 2, 3)
        for r in members:
            ids = loaders[r].sample_ids(step).tolist()
            assert len(ids) == (bs * 2 if (step, r) in {(3, 0), (4, 0), (5, 0)} else bs)
            seen += ids
    assert sorted(seen) == list(range(n))  # one epoch, every window once
    assert [loaders[0].sample_ids(s).tolist() for s in range(3)] == \
        [ReplicaLoader(w, 999, seed=2, replica=0, replicas=4, batch_size=bs).sample_ids(s).tolist() for s in range(3)]
    loaders[0].step = 9
    state = loaders[0].state_dict()
    two = [ReplicaLoader(w, 999, seed=2, replica=r, replicas=2, batch_size=bs) for r in range(2)]
    for loader in two:
        loader.load_state_dict(state)
    later = [i for step in range(9, 27) for loader in two for i in loader.sample_ids(step).tolist()]
    assert sorted(later) == list(range(n))  # resumed with 2: the next epoch, from where the stream stopped


def test_loader_resume_continues_identically():
    w = _windows(30)
    k = 7
    ref = ReplicaLoader(w, 999, seed=5, replica=1, replicas=2, batch_size=4)
    for _ in range(k):
        ref.next_batch()
    state = ref.state_dict()
    assert state["step"] == k
    resumed = ReplicaLoader(w, 999, seed=5, replica=1, replicas=2, batch_size=4)
    resumed.load_state_dict(state)
    assert resumed.step == k
    for _ in range(10):  # crosses epoch boundaries (30 / 8 windows per step)
        a, b = ref.next_batch(), resumed.next_batch()
        assert a.sample_ids == b.sample_ids
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


def test_loader_seed_changes_order():
    w = _windows(50)
    a = ReplicaLoader(w, 999, seed=1, replica=0, replicas=1, batch_size=10)
    b = ReplicaLoader(w, 999, seed=2, replica=0, replicas=1, batch_size=10)
    assert _ids(a, range(5)) != _ids(b, range(5))
    assert sorted(sum(_ids(a, range(5)), [])) == sorted(sum(_ids(b, range(5)), [])) == list(range(50))


# ---------------------------------------------------------------- batches


def test_make_batch_targets_and_doc_ids():
    eos = 9
    windows = np.array([[1, 2, eos, 3, 4, eos, eos, 5, 6],
                        [eos, 1, 2, 3, 4, 5, 6, 7, eos],
                        [1, 2, 3, 4, 5, 6, 7, 8, 1]])
    b = make_batch(windows, np.array([2, 0, 1]), eos)
    assert b.sample_ids == [2, 0, 1]
    assert b.inputs.dtype == torch.int64
    assert torch.equal(b.inputs, torch.from_numpy(windows[[2, 0, 1], :-1]))
    assert torch.equal(b.targets, torch.from_numpy(windows[[2, 0, 1], 1:]))
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])  # targets are inputs shifted by one
    assert b.doc_ids.tolist() == [[0, 0, 0, 0, 0, 0, 0, 0],
                                  [0, 0, 0, 1, 1, 1, 2, 3],
                                  [0, 1, 1, 1, 1, 1, 1, 1]]
    assert b.n_tokens == 3 * 8


def test_make_batch_doc_ids_step_after_each_eos():
    rng = np.random.default_rng(0)
    eos = 20
    windows = rng.integers(0, eos + 1, size=(6, 33))
    b = make_batch(windows, np.arange(6), eos)
    assert (b.doc_ids[:, 0] == 0).all()
    step = b.doc_ids[:, 1:] - b.doc_ids[:, :-1]
    assert torch.equal(step, (b.inputs[:, :-1] == eos).long())


@pytest.mark.parametrize("n", [1, 2, 4])
def test_batch_split_concatenates_back(n):
    w = _windows(12)
    b = make_batch(w, np.array([3, 1, 4, 0, 5, 9, 2, 6]), eos=1003)
    parts = b.split(n)
    assert len(parts) == n
    assert all(len(p.sample_ids) == 8 // n and p.inputs.shape[0] == 8 // n for p in parts)
    assert torch.equal(torch.cat([p.inputs for p in parts]), b.inputs)
    assert torch.equal(torch.cat([p.targets for p in parts]), b.targets)
    assert torch.equal(torch.cat([p.doc_ids for p in parts]), b.doc_ids)
    assert sum((p.sample_ids for p in parts), []) == b.sample_ids
    assert sum(p.n_tokens for p in parts) == b.n_tokens


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_validation_batches_disjoint_and_cover(replicas):
    w = _windows(50)
    n_batches, bs = 4, 5
    shards = [validation_batches(w, 999, n_batches, bs, r, replicas) for r in range(replicas)]
    ids = [[i for b in shard for i in b.sample_ids] for shard in shards]
    for i in range(replicas):
        assert all(len(b.sample_ids) <= bs for b in shards[i])
        for b in shards[i]:
            assert b.inputs[:, 0].tolist() == b.sample_ids
        for j in range(i + 1, replicas):
            assert not set(ids[i]) & set(ids[j])
    assert sorted(i for shard in ids for i in shard) == list(range(n_batches * bs))
    # Fixed: the same call gives the same set.
    again = validation_batches(w, 999, n_batches, bs, 0, replicas)
    assert [b.sample_ids for b in again] == [b.sample_ids for b in shards[0]]


def test_validation_batches_fewer_windows_than_asked():
    w = _windows(7)
    shards = [validation_batches(w, 999, 4, 5, r, 2) for r in range(2)]
    assert sorted(i for s in shards for b in s for i in b.sample_ids) == list(range(7))


def test_batch_split_uneven_keeps_every_row():
    windows = np.arange(9 * 5).reshape(9, 5)
    batch = make_batch(windows, np.arange(9), eos=10_000)
    parts = batch.split(4)
    assert [len(p.sample_ids) for p in parts] == [2, 2, 3, 2]
    assert sum((p.sample_ids for p in parts), []) == list(range(9))
    assert [len(p.sample_ids) for p in make_batch(windows, np.arange(3), eos=10_000).split(4)] == [1, 1, 1]
