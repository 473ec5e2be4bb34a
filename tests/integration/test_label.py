"""`mmalign label`: a real click-through in headless Chromium against the real server, a kill and a
restart, concurrent answers, and D3PO trained on the labels."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from mmalign.label.store import LabelError, LabelStore
from tests.helpers import ROOT, write_config
from tests.helpers.browser import assert_not_blank, chromium, console_errors, wait_for

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(scope="module")
def round_dir(tiny_sd, tmp_path_factory):
    """A labelling round of the base model: 3 pairs (samples 2j, 2j+1 of prompt j)."""
    from mmalign.cli import main

    out = tmp_path_factory.mktemp("label_round")
    args = ["sample", "--pretrained", str(tiny_sd), "--label-pairs", "--eta", "1.0", "--steps", "3", "--out", str(out)]
    assert main(args + [a for p in PROMPTS for a in ("--prompt", p)]) == 0
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(directory, port) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmalign.cli", "label", str(directory), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/pairs", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start in 60 s")


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # no clean shutdown: what was answered must already be on disk
    proc.wait(10)
    proc.stdout.close()


def _answers(directory) -> list[tuple]:
    rows = [json.loads(line) for line in (directory / "pairs.jsonl").read_text().splitlines()]
    return [(r["choice"], r["tie"]) for r in rows]


def _wait_text(browser, element_id, text, timeout=5.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if browser.find_element("id", element_id).text == text:
            return
        time.sleep(0.05)
    raise AssertionError(f"#{element_id} is {browser.find_element('id', element_id).text!r}, not {text!r}")


def _press(browser, key, progress):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).send_keys(key).perform()
    _wait_text(browser, "progress", progress)


def test_label_by_keyboard_undo_kill_restart_then_train_d3po(round_dir, tmp_path, tiny_sd, tiny_clip, pairs_manifest):
    from selenium.webdriver.common.keys import Keys

    work = tmp_path / "round"
    import shutil

    shutil.copytree(round_dir, work)
    port = _free_port()
    server = _start(work, port)
    try:
        with chromium() as browser:
            t0 = time.perf_counter()
            browser.get(f"http://127.0.0.1:{port}/")
            _wait_text(browser, "progress", "0 / 3 labelled")
            assert browser.find_element("id", "prompt").text == PROMPTS[0]
            wait_for(
                browser,
                "return document.querySelector('#left img').complete && "
                "document.querySelector('#left img').naturalWidth > 0",
            )  # the image has loaded
            assert_not_blank(browser.get_screenshot_as_png())
            _press(browser, Keys.ARROW_LEFT, "1 / 3 labelled")  # pair 0: left
            _press(browser, Keys.ARROW_RIGHT, "2 / 3 labelled")  # pair 1: right ...
            _press(browser, "u", "1 / 3 labelled")  # ... undone
            assert browser.find_element("id", "prompt").text == PROMPTS[1]
            _press(browser, "t", "2 / 3 labelled")  # pair 1: tie
            assert browser.find_element("id", "prompt").text == PROMPTS[2]
            _press(browser, "s", "2 / 3 labelled")  # pair 2: skipped (the only one left: it stays)
            assert console_errors(browser) == []
            assert time.perf_counter() - t0 < 20
    finally:
        _kill(server)
    assert _answers(work) == [(0, False), (None, True), (None, False)]

    server = _start(work, port)  # a restart picks up where the file is
    try:
        with chromium() as browser:
            browser.get(f"http://127.0.0.1:{port}/")
            _wait_text(browser, "progress", "2 / 3 labelled")
            tab_a = browser.current_window_handle
            browser.switch_to.new_window("tab")  # a second tab on the same pair
            browser.get(f"http://127.0.0.1:{port}/")
            _wait_text(browser, "progress", "2 / 3 labelled")
            tab_b = browser.current_window_handle
            browser.switch_to.window(tab_a)
            assert browser.find_element("id", "prompt").text == PROMPTS[2]
            _press(browser, "2", "3 / 3 labelled")  # pair 2: right, in tab A
            assert browser.find_element("id", "done").is_displayed()
            browser.switch_to.window(tab_b)  # tab B still shows pair 2 unanswered ...
            _press(browser, "1", "3 / 3 labelled")  # ... its answer is refused, and it catches up
            assert "answered meanwhile" in browser.find_element("id", "status").text
            errors = console_errors(browser)  # only Chromium's note of the refused request
            assert all("api/label" in e and "409" in e for e in errors), errors
    finally:
        _kill(server)
    assert _answers(work) == [(0, False), (None, True), (1, False)]  # tab A's answer stands
    assert not list(work.glob(".pairs.jsonl.*[!k]"))  # no temporary file left behind

    # D3PO trains on the labels: pair 0 prefers sample 0 over 1, pair 2 sample 5 over 4, pair 1 a tie
    from mmalign.config import load_config
    from mmalign.trainer import Trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("unused\n")
    cfg = write_config(
        tmp_path / "c.yaml",
        tiny_sd,
        tiny_clip,
        pairs_manifest,
        reward=None,
        method={"name": "d3po", "buffer": str(work), "labels": str(work / "pairs.jsonl")},
        data={"kind": "prompts", "prompts": str(prompts)},
        train={"steps": 2, "batch_size": 2},
    )
    Trainer(load_config(cfg), run_dir=tmp_path / "run").fit()
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logs[0]["rollout/pairs"] == 2.0 and logs[0]["rollout/ties"] == 1.0


def test_concurrent_answers_all_survive(round_dir, tmp_path):
    """Two tabs (threads here, each its own store, as two servers would be) answering at once."""
    import shutil

    work = tmp_path / "round"
    shutil.copytree(round_dir, work)
    rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 10))  # 30 pairs
    stores = [LabelStore(work), LabelStore(work)]
    errors = []

    def tab(k):
        try:
            for i in range(k, 30, 2):
                stores[k].answer(i, "left" if k == 0 else "right")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=tab, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _answers(work) == [(i % 2, False) for i in range(30)]


def test_app_serves_pairs_media_and_refuses_bad_answers(round_dir, tmp_path):
    import shutil

    from starlette.testclient import TestClient

    from mmalign.label.app import create_app

    work = tmp_path / "round"
    shutil.copytree(round_dir, work)
    client = TestClient(create_app(work), base_url="http://127.0.0.1")
    summary = client.get("/api/pairs").json()
    assert summary["total"] == 3 and summary["done"] == 0
    url = summary["pairs"][0]["media"][1]["url"]
    assert client.get("/" + url).headers["content-type"] == "image/png"
    assert client.get("/media/pairs.jsonl").status_code == 404  # only the pairs' files
    assert client.get("/media/../../etc/passwd").status_code == 404
    assert client.post("/api/label", json={"index": 7, "answer": "left"}).status_code == 400
    assert "expected one of" in client.post("/api/label", json={"index": 0, "answer": "up"}).json()["error"]
    assert client.post("/api/label", json={"index": 0, "answer": "tie"}).json()["done"] == 1
    assert TestClient(create_app(work), base_url="http://evil.example").get("/").status_code == 400


def test_bad_input_is_one_line(tmp_path, round_dir, capsys):
    from mmalign.cli import main

    assert main(["label", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no pairs.jsonl to label" in err
    (tmp_path / "pairs.jsonl").write_text("\n")
    with pytest.raises(LabelError, match="no pairs"):
        LabelStore(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["label", str(round_dir), "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is in use" in err


def test_videos_and_audio_get_players(tmp_path):
    rows = [
        {"prompt": "a drum", "sample_ids": [0, 1], "choice": None, "tie": False, "audio": ["a.wav", "b.flac"]},
        {"prompt": "a cat", "sample_ids": [2, 3], "choice": None, "tie": False, "videos": ["c.mp4", "d.webm"]},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kinds = [[m["kind"] for m in p["media"]] for p in LabelStore(tmp_path).summary()["pairs"]]
    assert kinds == [["audio", "audio"], ["video", "video"]]
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "x", "images": ["only-one.png"]}) + "\n")
    with pytest.raises(LabelError, match=r"pairs.jsonl:1: expected a pair"):
        LabelStore(tmp_path)


def test_a_stale_tab_does_not_overwrite_another_tabs_answer(round_dir, tmp_path):
    import shutil

    from starlette.testclient import TestClient

    from mmalign.label.app import create_app

    work = tmp_path / "round"
    shutil.copytree(round_dir, work)
    tab_a = TestClient(create_app(work), base_url="http://127.0.0.1")
    tab_b = TestClient(create_app(work), base_url="http://127.0.0.1")
    assert tab_a.post("/api/label", json={"index": 0, "answer": "left", "expected": "clear"}).status_code == 200
    stale = tab_b.post("/api/label", json={"index": 0, "answer": "right", "expected": "clear"})
    assert stale.status_code == 409 and "answered meanwhile" in stale.json()["error"]
    assert stale.json()["pairs"][0]["state"] == "left"  # tab B gets the file's view
    assert _answers(work)[0] == (0, False)
    assert tab_b.post("/api/label", json={"index": 0, "answer": "right", "expected": "left"}).status_code == 200
