import pytest

from config import DataConfig
from data.dataset import load_corpus


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """A token cache of the default corpus shared by every test (tokenised once per session)."""
    path = str(tmp_path_factory.mktemp("corpus-cache"))
    load_corpus(DataConfig(cache_dir=path))
    return path
