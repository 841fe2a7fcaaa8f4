"""The paper's figures from a store the recorder wrote with the tiny random model (real prompts and roles)."""

from __future__ import annotations

import json

import numpy as np

from mechbiqa.analysis.attribution import attribute_store
from mechbiqa.analysis.paper_figures import paper_figures
from mechbiqa.store import ActivationStore
from studies import cache_activations, logit_lens
from tests.studies.test_studies import make_images


def test_paper_figures_of_a_recorded_store(tmp_path):
    make_images(tmp_path / "images")
    cache_activations.main(cache_activations.Config.tiny(tmp_path))
    store = tmp_path / "tiny.h5"
    data = paper_figures(store, tmp_path / "paper", k=4, last=2)  # the lens from the model the store names
    for name in ("fig3", "fig5", "fig6", "json"):
        assert (tmp_path / "paper").joinpath(data["files"][name]).is_file(), name
    assert json.loads((tmp_path / "paper" / "paper_figures.json").read_text())["fig3"]["sample_id"]
    fig5 = data["fig5"]
    heat = np.array(fig5["heat"])
    with ActivationStore.open(store) as s:
        attr = attribute_store(s)
        n_image = attr.image_attention.shape[1]
    image = [g for g in fig5["segments"] if g["role"] == "image"]
    assert len(image) == 1 and image[0]["stop"] - image[0]["start"] == n_image
    # one prompt template: every sample is kept, and the image columns are the attention to each image index
    assert fig5["n_excluded"] == 0 and fig5["n_samples"] == len(attr.sample_ids)
    np.testing.assert_allclose(heat[:, image[0]["start"] : image[0]["stop"]], attr.image_attention, atol=1e-6)
    assert np.array(data["fig3"]["top_probs"]).shape == (len(fig5["layers"]), 4)

    # the logit-lens study draws them on request, and prints Fig. 6 as a table
    import io

    from rich.console import Console

    result = logit_lens.main(logit_lens.Config.tiny(tmp_path, paper_figures=True))
    assert result.files["paper fig3"].is_file() and result.paper["fig6"]["label"] == "poor"
    console = Console(file=io.StringIO(), width=80)
    logit_lens.render(result, console)
    text = console.file.getvalue()
    assert "Fig. 6" in text and max(map(len, text.splitlines())) <= 80
