"""``ssd300 serve`` end to end: one server (MLServer, 2 workers) per module on 127.0.0.1, queried with
the official v2 client (tritonclient), plain uploads, bad inputs, concurrent load, the page in
headless Chromium, and last a SIGTERM that must drain the requests in flight and exit 0."""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
from PIL import Image

from conftest import MakeTinyCheckpoint, MakeTinyModel

pytest.importorskip("mlserver", reason="the serve extra is not installed")
tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (serve extra) is not installed")
requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow
MODEL_NAME = "ssd300"
MAX_BODY_MB = 2


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def skimage_photo(name: str) -> Path:
    skimage = pytest.importorskip("skimage")
    return Path(skimage.__file__).parent / "data" / name


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int, grpc_port: int, metrics_port: int, log: Path
                 ) -> None:
        self.process, self.port, self.grpc_port, self.metrics_port = process, port, grpc_port, metrics_port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_server(checkpoint: Path, folder: Path, workers: int = 2, timeout_s: float = 180.0) -> Server:
    port, grpc_port, metrics_port = free_ports(3)
    log = folder / "server.log"
    command = [sys.executable, "-m", "ssd300", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
               "--port", str(port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
               "--workers", str(workers), "--max-batch-size", "4", "--batch-timeout-ms", "30",
               "--max-body-mb", str(MAX_BODY_MB)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder)
    server = Server(process, port, grpc_port, metrics_port, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.url}/v2/health/ready", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise AssertionError(f"server not ready in {timeout_s} s:\n{server.log_tail()}")


def stop_server(server: Server) -> Optional[int]:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
    return server.process.returncode


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real photos: a PNG and a JPEG big enough for the reduced-scale decode."""
    folder = tmp_path_factory.mktemp("photos")
    cat = Image.open(skimage_photo("chelsea.png")).convert("RGB")
    cat.resize((1353, 900)).save(folder / "cat.jpg", quality=90)
    shutil.copy(skimage_photo("astronaut.png"), folder / "astronaut.png")
    shutil.copy(skimage_photo("coffee.png"), folder / "coffee.png")
    return {"jpeg": folder / "cat.jpg", "png": folder / "astronaut.png", "png2": folder / "coffee.png"}


@pytest.fixture(scope="module")
def checkpoint(make_tiny_checkpoint: MakeTinyCheckpoint, make_tiny_model: MakeTinyModel,
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("serve") / "ssd.pt", model=make_tiny_model(3, conf_scale=0.3))


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = start_server(checkpoint, tmp_path_factory.mktemp("server"))
    try:
        yield started
    finally:
        stop_server(started)


@pytest.fixture(scope="module")
def detect_json(checkpoint: Path, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                ) -> dict[str, dict[str, Any]]:
    """What ``ssd300 detect`` writes for each photo (detections/<stem>.json)."""
    from ssd300.cli import main

    out = tmp_path_factory.mktemp("detect") / "out"
    assert main(["detect", *map(str, files.values()), "--checkpoint", str(checkpoint), "--out", str(out),
                 "--no-images"]) == 0
    return {key: json.loads((out / "detections" / f"{path.stem}.json").read_text()) for key, path in files.items()}


def assert_same_detections(served: dict[str, Any], expected: dict[str, Any]) -> None:
    assert (served["width"], served["height"]) == (expected["width"], expected["height"])
    got, want = served["detections"], expected["detections"]
    assert len(got) == len(want) > 0
    assert [d["class_name"] for d in got] == [d["class_name"] for d in want]
    assert [d["category_id"] for d in got] == [d["category_id"] for d in want]
    assert np.allclose([d["box"] for d in got], [d["box"] for d in want], atol=0.02)
    assert np.allclose([d["score"] for d in got], [d["score"] for d in want], atol=2e-5)


def v2_client(server: Server) -> Any:
    return tritonclient_http.InferenceServerClient(url=f"127.0.0.1:{server.port}", connection_timeout=60,
                                                   network_timeout=60)


def v2_images_input(paths: list[Path]) -> Any:
    data = np.array([base64.b64encode(p.read_bytes()).decode("ascii") for p in paths], dtype=np.object_)
    tensor = tritonclient_http.InferInput("image", [len(paths)], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=False)
    return tensor


def test_health_and_model_metadata_with_the_v2_client(server: Server) -> None:
    client = v2_client(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    metadata = client.get_model_metadata(MODEL_NAME)
    assert metadata["name"] == MODEL_NAME
    assert metadata["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"] == [{"name": "detections", "datatype": "BYTES", "shape": [-1]}]
    assert requests.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
    # each of the 2 workers on its own core(s) where there are enough (ssd300.serving.claim_worker_cores)
    claimed = re.findall(r"worker \d+ on cores (\[[\d, ]+\])", server.log.read_text(errors="replace"))
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
        assert len(claimed) == 2 and claimed[0] != claimed[1], claimed


def test_v2_infer_with_the_official_client_gives_detects_numbers(
        server: Server, files: dict[str, Path], detect_json: dict[str, dict[str, Any]]) -> None:
    client = v2_client(server)
    keys = ["jpeg", "png", "png2"]
    result = client.infer(MODEL_NAME, [v2_images_input([files[k] for k in keys])],
                          outputs=[tritonclient_http.InferRequestedOutput("detections", binary_data=False)])
    answers = result.as_numpy("detections")
    assert answers.shape == (3,)
    for key, text in zip(keys, answers):
        assert_same_detections(json.loads(text), detect_json[key])


def test_upload_endpoint_raw_and_multipart_give_detects_numbers(
        server: Server, files: dict[str, Path], detect_json: dict[str, dict[str, Any]]) -> None:
    raw = requests.post(f"{server.url}/detect", data=files["jpeg"].read_bytes(),
                        headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert raw.status_code == 200, raw.text
    assert_same_detections(raw.json(), detect_json["jpeg"])
    assert raw.json()["server_ms"] > 0
    with open(files["png"], "rb") as handle:
        form = requests.post(f"{server.url}/detect", files={"file": ("astronaut.png", handle, "image/png")}, timeout=60)
    assert form.status_code == 200, form.text
    assert form.json()["image"] == "astronaut.png"
    assert_same_detections(form.json(), detect_json["png"])


# The official gRPC client, in its own process: tritonclient.grpc and MLServer (imported by this
# module's importorskip) register the same v2 protobuf messages, which one process refuses.
GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as v2

port, model, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
client = v2.InferenceServerClient(f"127.0.0.1:{port}")
assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
metadata = client.get_model_metadata(model, as_json=True)
image = v2.InferInput("image", [len(paths)], "BYTES")
image.set_data_from_numpy(np.array([open(p, "rb").read() for p in paths], dtype=np.object_))
result = client.infer(model, [image], outputs=[v2.InferRequestedOutput("detections")])
try:
    client.infer(model, [v2.InferInput("pixels", [1], "BYTES").set_data_from_numpy(np.array([b"x"], dtype=np.object_))])
    refused = None
except v2.InferenceServerException as error:
    refused = error.message()
print(json.dumps({"inputs": metadata["inputs"], "answers": [a.decode() for a in result.as_numpy("detections")],
                  "refused": refused}))
"""


def test_v2_grpc_with_the_official_client_sends_raw_bytes_and_gives_detects_numbers(
        server: Server, files: dict[str, Path], detect_json: dict[str, dict[str, Any]]) -> None:
    if importlib.util.find_spec("tritonclient.grpc") is None or importlib.util.find_spec("grpc") is None:
        pytest.skip("tritonclient[grpc] is not installed")
    keys = ["jpeg", "png"]
    done = subprocess.run([sys.executable, "-c", GRPC_CLIENT, str(server.grpc_port), MODEL_NAME,
                           *[str(files[k]) for k in keys]], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert reply["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": ["-1"]}]
    for key, text in zip(keys, reply["answers"]):
        assert_same_detections(json.loads(text), detect_json[key])
    assert reply["refused"] is not None and "expected one input" in reply["refused"]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def v2_body(data: list[str], **changes: Any) -> str:
    tensor = {"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data, **changes}
    return json.dumps({"inputs": [tensor]})


def test_bad_inputs_each_get_a_one_line_4xx_and_the_server_keeps_serving(
        server: Server, files: dict[str, Path], detect_json: dict[str, dict[str, Any]]) -> None:
    jpeg = files["jpeg"].read_bytes()
    good_b64 = base64.b64encode(files["png"].read_bytes()).decode("ascii")
    detect, infer = f"{server.url}/detect", f"{server.url}/v2/models/{MODEL_NAME}/infer"
    octet = {"Content-Type": "application/octet-stream"}
    as_json = {"Content-Type": "application/json"}
    cases = {
        "non-image": (detect, b"hello, I am text", octet, 400, "not an image file"),
        "truncated image": (detect, jpeg[: len(jpeg) // 2], {"Content-Type": "image/jpeg"}, 400, "truncated"),
        "100-megapixel image": (detect, _png(Image.new("1", (10_000, 10_000))), octet, 413, "megapixels"),
        "empty body": (detect, b"", {"Content-Type": "image/png"}, 400, "empty body"),
        "wrong content type": (detect, jpeg, {"Content-Type": "text/plain"}, 415, "content type"),
        "body over the limit": (detect, b"\xff" * (MAX_BODY_MB * 1024 * 1024 + 1), octet, 413, "limit"),
        "multipart without a file": (detect, b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--\r\n",
                                     {"Content-Type": "multipart/form-data; boundary=x"}, 400, "file"),
        "v2 not JSON": (infer, b"{not json", as_json, 400, "malformed request"),
        "v2 without inputs": (infer, b'{"outputs": []}', as_json, 400, "malformed request"),
        "v2 wrong input name": (infer, v2_body([good_b64], name="pixels").encode(), as_json, 400, "expected one input"),
        "v2 wrong datatype": (infer, v2_body([good_b64], datatype="FP32").encode(), as_json, 400, "BYTES"),
        "v2 shape and data disagree": (infer, v2_body([good_b64], shape=[2]).encode(), as_json, 400, "elements"),
        "v2 not base64": (infer, v2_body(["%%% not base64 %%%"]).encode(), as_json, 400, "base64"),
        "v2 truncated image": (infer, v2_body([base64.b64encode(jpeg[:5000]).decode()]).encode(), as_json, 400,
                               "truncated"),
        "v2 body over the limit": (infer, v2_body(["A" * (3 * MAX_BODY_MB * 1024 * 1024)]).encode(), as_json, 413,
                                   "limit"),
    }
    for case, (url, body, headers, status, words) in cases.items():
        response = requests.post(url, data=body, headers=headers, timeout=60)
        assert response.status_code == status, f"{case}: {response.status_code} {response.text[:300]}"
        assert "\n" not in response.text.strip(), case
        error = response.json()["error"]
        assert isinstance(error, str) and words in error, f"{case}: {error}"
    good = requests.post(detect, data=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert good.status_code == 200
    assert_same_detections(good.json(), detect_json["jpeg"])


def test_concurrent_requests_are_all_answered_and_a_bad_one_does_not_fail_its_batch(
        server: Server, files: dict[str, Path], detect_json: dict[str, dict[str, Any]]) -> None:
    keys = ["jpeg", "png", "png2"] * 4
    bodies: list[tuple[Optional[str], bytes]] = [(k, files[k].read_bytes()) for k in keys]
    bodies[5] = (None, files["jpeg"].read_bytes()[:4000])  # truncated: batched with good ones
    bodies[9] = (None, b"\x89PNG\r\n\x1a\n broken")

    def send(body: bytes) -> requests.Response:
        return requests.post(f"{server.url}/detect", data=body, headers={"Content-Type": "application/octet-stream"},
                             timeout=120)

    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(send, [body for _, body in bodies]))
    for (key, _), response in zip(bodies, responses):
        if key is None:
            assert response.status_code == 400 and "error" in response.json()
        else:
            assert response.status_code == 200, response.text
            assert_same_detections(response.json(), detect_json[key])


def test_prometheus_metrics(server: Server) -> None:
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    assert "model_infer_request_success" in text and MODEL_NAME in text


def test_page_in_headless_chromium_draws_the_boxes(server: Server, files: dict[str, Path],
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    page = requests.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and 'id="file"' in page.text
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    webdriver = None
    try:
        from selenium import webdriver
    except ImportError:
        pass
    if chromium is None or driver_path is None or webdriver is None:
        if os.environ.get("SSD300_REQUIRE_BROWSER") == "1":
            pytest.fail("SSD300_REQUIRE_BROWSER=1 but chromium, chromedriver or selenium is missing")
        pytest.skip("chromium, chromedriver or selenium is missing")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,1100"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        browser.set_page_load_timeout(60)
        browser.get(f"{server.url}/")
        browser.find_element(By.ID, "threshold").send_keys("")  # the page is interactive
        browser.find_element(By.ID, "file").send_keys(str(files["png"]))
        WebDriverWait(browser, 90).until(lambda b: "detections" in b.find_element(By.ID, "status").text
                                         or "rror" in b.find_element(By.ID, "status").text)
        status = browser.find_element(By.ID, "status").text
        assert "detections" in status and " ms" in status, status
        drawn = int(browser.find_element(By.ID, "canvas").get_attribute("data-boxes") or 0)
        rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert drawn > 0 and len(rows) == drawn
        # the canvas holds the photo at full size with coloured boxes on it
        width = browser.execute_script("return document.getElementById('canvas').width")
        assert width == 512
        shot = Path(os.environ.get("SSD300_SCREENSHOT_DIR") or tmp_path_factory.mktemp("shots")) / "serve_page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        browser.quit()


def test_sigterm_drains_requests_in_flight_and_exits_0(server: Server, files: dict[str, Path],
                                                       detect_json: dict[str, dict[str, Any]]) -> None:
    """Runs last: it stops the module's server."""
    client_paths = [files["jpeg"], files["png"], files["png2"], files["jpeg"]]
    body = json.dumps({"inputs": [{"name": "image", "shape": [len(client_paths)], "datatype": "BYTES",
                                   "data": [base64.b64encode(p.read_bytes()).decode() for p in client_paths]}]})

    def send(_: int) -> requests.Response:
        return requests.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", data=body,
                             headers={"Content-Type": "application/json"}, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(send, i) for i in range(6)]
        time.sleep(0.5)  # the requests are in flight (6 x 4 images take seconds on two workers)
        server.process.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert server.process.wait(90) == 0, server.log_tail()
    drained = re.search(r"draining (\d+) requests in flight", server.log.read_text(errors="replace"))
    assert drained is not None and int(drained.group(1)) >= 1, server.log_tail()
    assert all(not f.running() for f in futures)
    for response in responses:
        assert response.status_code == 200, response.text
        answers = response.json()["outputs"][0]["data"]
        assert_same_detections(json.loads(answers[1]), detect_json["png"])
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/v2/health/live", timeout=5)
