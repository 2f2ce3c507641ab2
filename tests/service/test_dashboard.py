"""The dashboard in a real headless Chromium (driven through selenium and the system
chromedriver), against a real service, Redis holding live registry versions, worker time
series, logged chat requests and a learner state."""

import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from strop.queues import dead_letter_key
from strop.records import AdapterVersion, Keys, PromotionHalt
from strop.registry import Registry
from strop.series import Obs, write_series
from tests.service.conftest import ADMIN_KEY, API_KEY
from tests.service.harness import ServerThread, make_adapter

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
VERSIONS = ("v31", "v32")  # numbers no other test's shared engine uses
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # without these Chromium dials out at start, and this closed network refuses it
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.fail("chromium and chromedriver are not installed (.ci/setup installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # to catch JS errors
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


@pytest.fixture
def live_settings(settings, tmp_path, tiny_model_dir):
    root = tmp_path / "adapters"
    for i, v in enumerate(VERSIONS):
        make_adapter(root / v, tiny_model_dir, seed=30 + i)
    return settings.model_copy(update={"adapter_dir": root})


def seed_redis(r, settings) -> Registry:
    """What a running system leaves in Redis: v31 promoted, then v32 on top of it, v33
    rejected by the gate; 40 minutes of worker series; a waiting learner."""
    keys, now = Keys(settings.redis_prefix), time.time()
    registry = Registry(r, keys)
    for n, parent in ((31, "base"), (32, "v31"), (33, "v32")):
        registry.add(
            AdapterVersion(
                version=f"v{n}",
                parent=parent,
                path=str(settings.adapter_dir / f"v{n}"),
                created=now - (34 - n) * 900,
                algorithm="dpo",
                consumed={keys.pairs: [f"{i}-0" for i in range(16)]},
                train_metrics={"loss/dpo": 0.69 - (n - 30) * 0.03, "grad/norm": 1.1},
                gate={
                    "gate/kl": 0.02 * (n - 30),
                    "gate/reward_parent": 3.0,
                    "gate/reward_candidate": 3.4 if n < 33 else 2.1,
                    "gate/canary_parent": 0.5,
                    "gate/canary_candidate": 0.6 if n < 33 else 0.25,
                },
            )
        )
    registry.promote("v31")
    registry.promote("v32")
    registry.reject("v33", "reward drop 0.90 > tolerance 0.10")
    with r.pipeline() as pipe:
        for k in range(40, 0, -1):  # one write per minute, 40 minutes back to now
            v = "base" if k > 28 else "v31" if k > 14 else "v32"
            lift = {"base": 0.0, "v31": 0.1, "v32": 0.2}[v]
            obs = [
                Obs("reward", v, (0.4 + lift + 0.05 * (k % 3)) * 8, 8),
                Obs("majority_ratio", v, 0.5 + lift + 0.03 * (k % 4)),
                Obs("judge_score", v, 2.8 + 5 * lift + 0.1 * (k % 5), label="3"),
                Obs("ingested", v, count=4 + k % 3),
                Obs("built", v, label="ttrl", count=3),
                Obs("pairs", v, count=2 + k % 2),
                Obs("dropped", v, label="no_signal", count=k % 2),
                Obs("feedback", v, label="up" if k % 3 else "down"),
                Obs("feedback_agreement", v, float(k % 4 != 0)),
            ]
            write_series(pipe, keys, obs, now - k * 60)
        pipe.execute()
    r.hset(  # the worker's per-key trust counts: k-bad contradicts clear majorities
        keys.feedback_trust,
        mapping={"agree:k-good": 20, "disagree:k-good": 1, "agree:k-bad": 2, "disagree:k-bad": 10},
    )
    r.hset(
        keys.learner_state,
        mapping={
            "phase": "waiting",
            "updated": time.time(),
            "pid": 4242,
            "parent": "v32",
            "buffered": 3,
            "waiting_s": 4.0,
            "metrics": json.dumps({"loss/dpo": 0.61, "grad/norm": 0.9}),
            "dropped": json.dumps({}),
        },
    )
    return registry


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
        except Exception:  # an element re-rendered under us: look again
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_dashboard_live_data_renders_charts_and_rollback_moves_pointer(
    live_settings, tiny_engine, redis_client, browser
):
    from selenium.webdriver.common.by import By

    registry = seed_redis(redis_client, live_settings)
    keys = Keys(live_settings.redis_prefix)
    for i in range(2):  # builds the worker gave up on (a refused key)
        redis_client.xadd(
            dead_letter_key(keys.prefix), {"log_id": f"{i}-0", "reason": "unauthorized"}
        )
    with ServerThread(live_settings, tiny_engine) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        for i in range(4):
            client.chat.completions.create(
                model="strop", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=4
            )
        wait_for(lambda: redis_client.xlen(keys.prompt_log) >= 4, what="the prompt log")

        browser.get(server.url + "/dashboard")
        # no key yet: the data endpoint refuses, and the page says what to do
        banner = wait_for(
            lambda: (e := browser.find_element(By.ID, "error")).is_displayed() and e,
            what="the 401 banner",
        )
        assert "API key" in banner.text
        browser.find_element(By.ID, "api-key").send_keys(API_KEY)
        browser.find_element(By.ID, "admin-key").send_keys(ADMIN_KEY)
        wait_for(
            lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ok",
            what="data to load",
        )

        def row(version: str):
            return browser.find_element(By.CSS_SELECTOR, f'#versions tr[data-version="{version}"]')

        assert row("v32").get_attribute("data-status") == "promoted"
        assert "serving" in row("v32").get_attribute("class")
        assert row("v31").get_attribute("data-status") == "promoted"
        assert row("v33").get_attribute("data-status") == "rejected"
        assert "reward drop" in row("v33").text
        assert "3.00 → 3.40" in row("v32").text  # gate reward, parent -> candidate
        assert "0.50 → 0.25" in row("v33").text  # canary accuracy, parent -> candidate
        assert "(96)" in row("base").text  # 12 minutes of 8 rewards sampled by the base model

        # reward chart: one line per behaviour version, with points from the series
        lines = browser.find_elements(By.CSS_SELECTOR, "#chart-reward path.line")
        points = {
            p.get_attribute("data-series"): int(p.get_attribute("data-points")) for p in lines
        }
        assert points.keys() == {"base", "v31", "v32"} and all(n >= 10 for n in points.values())
        assert browser.find_elements(By.CSS_SELECTOR, "#chart-reward circle")
        for chart in ("chart-majority", "chart-judge", "chart-traffic", "chart-agreement"):
            assert browser.find_elements(By.CSS_SELECTOR, f"#{chart} path.line"), chart

        def tile(label: str) -> str:
            sel = f'.tile[data-tile="{label}"] .tile-value'
            return browser.find_element(By.CSS_SELECTOR, sel).text

        assert int(tile("requests logged")) >= 4
        assert int(tile("requests served")) >= 4
        assert int(tile("groups built")) > 0 and int(tile("pairs")) > 0
        assert tile("serving") == "v32"
        assert browser.find_element(By.ID, "learner-phase").text == "waiting"
        # feedback: up vs down per version, label agreement, the untrusted key
        fb_row = browser.find_element(By.CSS_SELECTOR, '#feedback tr[data-version="v32"]')
        assert fb_row.text.split()[:4] == ["v32", "14", "10", "4"]  # rated, up, down
        assert browser.find_element(By.ID, "feedback-agreement").text == "0.75"
        untrusted = browser.find_element(By.ID, "feedback-keys").text
        assert "k-bad disagreed with 10 of 12" in untrusted and "k-good" not in untrusted
        assert int(tile("feedback")) == 40
        assert browser.find_element(By.CSS_SELECTOR, '#queues tr[data-queue="prompt_log"]')
        dead = browser.find_element(By.CSS_SELECTOR, '#queues tr[data-queue="dead_letter"]')
        assert "dead letters 2" in dead.text and "strop worker requeue" in dead.text

        # rollback: the first click names the move, the second makes it
        button = browser.find_element(By.ID, "rollback")
        button.click()
        assert button.text == "Confirm: v32 → v31"
        button.click()
        result = wait_for(
            lambda: (
                "Rolled back" in (t := browser.find_element(By.ID, "rollback-result").text) and t
            ),
            what="the rollback result",
        )
        assert result == "Rolled back: v32 → v31"
        assert registry.promoted() == "v31"
        assert registry.get("v32").status == "rolled_back"
        wait_for(
            lambda: browser.find_element(By.ID, "serving").text == "strop → v31",
            what="the page to show v31 serving",
        )
        wait_for(lambda: row("v32").get_attribute("data-status") == "rolled_back")

        # no script errors (the one expected failure is the keyless 401 at the start)
        errors = [
            e["message"]
            for e in browser.get_log("browser")
            if e["level"] == "SEVERE" and "401" not in e["message"]
        ]
        assert errors == []

        # the whole page, for a person to look at
        ARTIFACTS.mkdir(exist_ok=True)
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.execute_cdp_cmd(  # a viewport as tall as the page: one full-page shot
            "Emulation.setDeviceMetricsOverride",
            {"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        time.sleep(0.3)  # one layout pass at the new size
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))


def test_dashboard_data_without_key_returns_401_and_page_is_public(settings, tiny_engine):
    with ServerThread(settings, tiny_engine) as server:
        page = httpx.get(server.url + "/dashboard")
        assert page.status_code == 200 and "<title>strop dashboard</title>" in page.text
        for name in ("dashboard.js", "dashboard.css"):
            assert httpx.get(f"{server.url}/dashboard/static/{name}").status_code == 200
        assert httpx.get(server.url + "/dashboard/static/..%2Fapp.py").status_code == 404

        denied = httpx.get(server.url + "/dashboard/data")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "missing_api_key"

        auth = {"Authorization": f"Bearer {API_KEY}"}
        data = httpx.get(server.url + "/dashboard/data?window=900", headers=auth).json()
        assert data["window_s"] == 900 and data["versions"] == [] and data["learner"] is None
        assert data["queues"]["dead_letter"] == 0
        assert len(data["traffic"]["minutes"]) in (15, 16)
        bad = httpx.get(server.url + "/dashboard/data?window=5", headers=auth)
        assert bad.status_code == 400


def test_dashboard_promotion_halted_shows_banner_with_reason(
    live_settings, tiny_engine, redis_client, browser
):
    from selenium.webdriver.common.by import By

    registry = seed_redis(redis_client, live_settings)
    registry.rollback(to="v31", reason="auto: collapse guard tripped: majority ratio 1.000")
    registry.halt(
        PromotionHalt(version="v32", rolled_back_to="v31", reason="majority ratio 1.000 >= 0.95")
    )
    with ServerThread(live_settings, tiny_engine) as server:
        browser.get(server.url + "/dashboard")
        browser.find_element(By.ID, "api-key").send_keys(API_KEY)
        banner = wait_for(
            lambda: (e := browser.find_element(By.ID, "halted")).is_displayed() and e,
            what="the halted banner",
        )
        assert banner.text.startswith("promotion halted: majority ratio 1.000 >= 0.95")
        assert "rolled v32 back to v31" in banner.text and "strop adapters resume" in banner.text
        events = browser.find_element(By.ID, "events").text
        assert "halted" in events

        registry.resume()  # the next poll hides it
        wait_for(
            lambda: not browser.find_element(By.ID, "halted").is_displayed(),
            what="the banner to go",
        )
        errors = [
            e["message"]
            for e in browser.get_log("browser")
            if e["level"] == "SEVERE" and "401" not in e["message"]
        ]
        assert errors == []


def test_dashboard_data_feedback_rate_up_down_per_version_agreement_and_untrusted_keys(
    settings, tiny_engine, redis_client
):
    """What the worker leaves in Redis (its feedback series and per-key trust counts), as
    the dashboard's data reports it: no probe file involved."""
    keys, now = Keys(settings.redis_prefix), time.time()
    with redis_client.pipeline() as pipe:
        obs = [Obs("feedback", "v1", label="up")] * 3 + [Obs("feedback", "v1", label="down")]
        obs += [Obs("feedback", "v2", label="down")] * 2 + [Obs("feedback", "v2", label="answer")]
        obs += [Obs("feedback_agreement", "v1", x) for x in (1.0, 1.0, 0.0)]
        obs += [Obs("feedback_agreement", "v2", 1.0)]
        write_series(pipe, keys, obs, now - 120)
        pipe.execute()
    redis_client.hset(
        keys.feedback_trust,
        mapping={"agree:k-good": 20, "disagree:k-good": 1, "agree:k-bad": 2, "disagree:k-bad": 10},
    )
    with ServerThread(settings, tiny_engine) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        for i in range(4):
            client.chat.completions.create(
                model="strop", messages=[{"role": "user", "content": f"Rate me {i}"}], max_tokens=2
            )
        wait_for(lambda: redis_client.xlen(keys.prompt_log) >= 4, what="the prompt log")
        auth = {"Authorization": f"Bearer {API_KEY}"}
        fb = httpx.get(server.url + "/dashboard/data", headers=auth).json()["feedback"]
        page = httpx.get(server.url + "/dashboard").text
        script = httpx.get(server.url + "/dashboard/static/dashboard.js").text
    assert fb["total"] == 7 and fb["kinds"] == {"up": 3, "down": 3, "answer": 1}
    assert fb["rate"] == 7 / 4  # feedback read per request logged in the window
    assert fb["agreement"] == 0.75 and fb["agreement_n"] == 4
    v1, v2 = fb["per_version"]["v1"], fb["per_version"]["v2"]
    assert (v1["total"], v1["up_share"], v1["agreement"], v1["agreement_n"]) == (4, 0.75, 2 / 3, 3)
    assert (v2["total"], v2["up_share"], v2["agreement"]) == (3, 0.0, 1.0)
    trust = fb["trust"]
    assert trust["keys_rated"] == 2 and [k["key_id"] for k in trust["flagged"]] == ["k-bad"]
    (bad,) = trust["flagged"]
    assert (bad["disagree"], bad["rated"]) == (10, 12) and bad["rest_rate"] == 1 / 21
    # the page has the table the script fills
    assert 'id="feedback"' in page and "renderFeedback" in script
