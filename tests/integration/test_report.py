"""`mmalign report`: a self-contained HTML page of real runs, checked in headless Chromium."""

import json
import re
import shutil
import time

import pytest

from mmalign.report import ReportError, build_report, curve_points, read_run
from tests.helpers import write_config
from tests.helpers.browser import assert_not_blank, chromium, console_errors, wait_for


@pytest.fixture(scope="module")
def runs(tiny_sd, tiny_clip, pairs_manifest, tmp_path_factory):
    """A real 3-step Diffusion-DPO run evaluated at every step, and a copy with other numbers (overlay)."""
    from mmalign.cli import main

    d = tmp_path_factory.mktemp("report_runs")
    cfg = write_config(
        d / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        eval={
            "enabled": True,
            "every": 1,
            "prompts": ["a red square", "a blue circle"],
            "num_steps": 2,
            "images_per_prompt": 2,
        },
    )
    assert main(["train", str(cfg), "--output-dir", str(d / "a" / "run")]) == 0
    other = d / "b" / "run"
    shutil.copytree(d / "a" / "run", other)
    rows = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if "eval" in r:
            r["eval"]["reward"] += 0.5
        if "loss" in r:
            r["loss"] *= 2
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "a" / "run", other


def test_report_has_curves_slider_pairs_and_config(runs, tmp_path):
    out = build_report(list(runs), tmp_path / "report.html")
    page = out.read_text()
    assert not re.search(r"""(src|href)=["']https?:""", page)  # self-contained: nothing fetched
    assert page.count("<svg") >= 2 and 'data-title="Proxy reward (held-out evaluation)"' in page
    assert page.count('class="step-slider"') == 2  # one per run
    assert "a/run" in page and "b/run" in page  # both runs named apart
    assert "Preference pairs (chosen, rejected)" in page and "a red square number 0" in page
    assert "Before / after, per prompt" in page and "a blue circle" in page
    assert "diffusion_dpo" in page and "Environment" in page
    run = read_run(runs[0])
    assert [s for s, _ in run.grids] == [0, 1, 2, 3]
    assert curve_points(run, "eval", "reward")["reward"][0] == [0, 1, 2, 3]


def test_report_renders_in_chromium_without_errors(runs, tmp_path):
    out = build_report(list(runs), tmp_path / "report.html")
    t0 = time.perf_counter()
    with chromium() as browser:
        browser.get(out.resolve().as_uri())
        assert console_errors(browser) == []
        assert len(browser.find_elements("css selector", ".curve svg path")) > 4  # the curves are drawn
        slider = browser.find_element("id", "slider-0")
        assert slider.get_attribute("max") == "3"
        assert browser.find_element("id", "step-0").text == "step 3"
        last = browser.find_element("id", "grid-0").get_attribute("src")
        browser.execute_script("arguments[0].value = 0; arguments[0].dispatchEvent(new Event('input'))", slider)
        assert browser.find_element("id", "step-0").text == "step 0"
        assert browser.find_element("id", "grid-0").get_attribute("src") != last
        wait_for(browser, "return document.getElementById('grid-0').naturalWidth > 0")  # the grid is shown
        assert_not_blank(browser.get_screenshot_as_png())
        assert console_errors(browser) == []
    assert time.perf_counter() - t0 < 20


def test_report_cli_and_bad_input(runs, tmp_path, capsys):
    from mmalign.cli import main

    assert main(["report", str(runs[0]), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 10_000
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "x.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a run directory" in err
    with pytest.raises(ReportError):
        build_report([], tmp_path / "y.html")
