"""The service's page in a real browser: headless Chromium (Debian's chromium and chromedriver) through Selenium
opens it, uploads a photo by its file input, finds the caption in the live region and as the photo's alt, and
reads it aloud, all by keyboard. Skips, saying why, where no browser can be had."""

import contextlib
import shutil
import threading
import time

import pytest
from PIL import Image
from test_serve import (  # as pytest imports it: so that the probe fixture is shared, not made again
    args_for,
    free_port,
    probe,  # noqa: F401
    torch_threads,
)

import serve
from tools.bench_web import BROWSER_FLAGS, WAITING

pytestmark = pytest.mark.slow  # every test here runs a command line, a service or a browser


@pytest.fixture
def chromium(tmp_path, monkeypatch):
    """A headless Chromium with a fresh profile, driven by Selenium, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.common.exceptions import WebDriverException

    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    monkeypatch.setenv("SE_AVOID_STATS", "true")  # Selenium Manager: no usage statistics sent
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in BROWSER_FLAGS:  # the benchmark's: headless, nothing reached but 127.0.0.1
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=driver, log_output=str(tmp_path / "chromedriver.log"))
    try:
        session = webdriver.Chrome(options=options, service=service)
    except WebDriverException as e:
        pytest.skip(f"chromium could not start: {str(e.msg or e).splitlines()[0]}")
    try:
        yield session
    finally:
        session.quit()


@contextlib.contextmanager
def serving_in_thread(app):
    """uvicorn serving `app` on a free port of 127.0.0.1 in a thread of this process; yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):
            if server.started and app.state.service.ready:
                break
            time.sleep(0.05)
        assert server.started and app.state.service.ready, "the server did not start"
        yield f"http://127.0.0.1:{server.config.port}/"
    finally:
        server.should_exit = True
        thread.join(30)


def active_id(driver):
    return driver.switch_to.active_element.get_attribute("id")


def test_page_captions_an_upload_announces_it_and_reads_it_aloud_by_keyboard(chromium, probe, tmp_path):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    photo, expected = probe.photos[0], probe.expected[probe.photos[0]]
    with torch_threads(1), serving_in_thread(serve.make_app(args_for(probe.path), probe.captioner)) as url:
        chromium.get(url)
        assert chromium.title == "Describe a photo"
        # speechSynthesis itself needs an audio device: record what the page asks it to say instead
        chromium.execute_script("window.spoken = []; speechSynthesis.speak = u => spoken.push(u.text);")
        ActionChains(chromium).send_keys(Keys.TAB).perform()
        assert active_id(chromium) == "photo"  # the first stop of the keyboard: the labelled file input
        field = chromium.find_element(By.ID, "photo")
        assert chromium.find_element(By.CSS_SELECTOR, "label[for=photo]").text == "Take or choose a photo"
        field.send_keys(str(photo))
        answer = chromium.find_element(By.ID, "answer")
        WebDriverWait(chromium, 60).until(lambda d: answer.text not in ("", WAITING))
        assert answer.text == expected["description"] and answer.get_attribute("aria-live") == "polite"
        shown = chromium.find_element(By.ID, "shown")
        assert shown.is_displayed() and shown.get_attribute("alt") == expected["description"]
        assert chromium.execute_script("return arguments[0].naturalWidth", shown) == Image.open(photo).width
        ActionChains(chromium).send_keys(Keys.TAB).perform()
        assert active_id(chromium) == "speak"
        ActionChains(chromium).send_keys(Keys.ENTER).perform()
        assert chromium.execute_script("return spoken") == [expected["description"]]
        chromium.save_screenshot(str(tmp_path / "page.png"))

        not_a_photo = tmp_path / "notes.jpg"
        not_a_photo.write_text("a shopping list, not a photo")
        field.send_keys(str(not_a_photo))
        WebDriverWait(chromium, 60).until(lambda d: answer.text.startswith("Sorry"))
        assert "not an image" in answer.text
        blocked = [e["message"] for e in chromium.get_log("browser") if "Content Security Policy" in e["message"]]
        assert not blocked  # the page's own script and style run under its policy
