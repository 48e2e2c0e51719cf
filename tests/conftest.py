import pytest

from launch.cluster import Cluster

from config import DataConfig
from data.dataset import load_corpus


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """A token cache of the default corpus shared by every test (tokenised once per session)."""
    path = str(tmp_path_factory.mktemp("corpus-cache"))
    load_corpus(DataConfig(cache_dir=path))
    return path


@pytest.fixture
def cluster(tmp_path, corpus_cache):
    """make(name, replicas, stages, *overrides, **cluster_args): a started coordinator for a tiny recovery run;
    every process it started is killed at the end of the test."""
    from tests.test_recovery import TINY
    made = []

    def make(name, replicas, stages, *overrides, **kw):
        c = Cluster(str(tmp_path / name), replicas, stages, [*TINY, f"data.cache_dir={corpus_cache}", *overrides], **kw)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.stop()
