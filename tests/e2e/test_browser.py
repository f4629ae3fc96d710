"""The pack in ComfyUI's own web UI: the CI host's server with the pack installed, driven by
headless Chromium (Debian's package) through Playwright. Every bundled graph is loaded into the
canvas, checked, photographed (a screenshot and the template browser's thumbnail), and queued
from the page on the project-made models; graphs saved with earlier versions of the nodes load
with the settings they were saved with.

Skipped, with the reason, when Chromium or Playwright is not installed (scripts/test.sh
installs both where it can). Every wait is bounded and the server is always stopped.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from asdm.harness import graphs, host
from asdm import autocache, compat
from asdm.harness import models as tm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Chromium is not installed (Debian package 'chromium'); browser test skipped",
                allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed; browser test skipped")

ROOT = host.REPO_ROOT
# Screenshots go to a temporary folder, or where ASDM_SCREENSHOTS says (the README's are made
# on current ComfyUI with ASDM_SCREENSHOTS=docs/screenshots): a test run leaves the tree as it was.
SHOTS = os.path.abspath(os.environ.get("ASDM_SCREENSHOTS") or os.path.join(
    __import__("tempfile").gettempdir(), "asdm-screenshots", os.environ.get("ASDM_HOST_KIND", "host")))
# The bundled graphs' thumbnails (<name>.jpg): a temporary folder, or where ASDM_THUMBNAILS says
# (example_workflows, on current ComfyUI, beside the screenshots).
THUMBS = os.path.abspath(os.environ.get("ASDM_THUMBNAILS") or os.path.join(SHOTS, "thumbnails"))
THUMB_WIDTH = 512   # the template card is 256 px wide; twice that for high-density screens
WORKFLOWS = graphs.bundled()
# The host's own front end, and the newest comfyui-frontend-package (what users of current ComfyUI
# get; scripts/setup_browser.sh installs it into the cache), served with --front-end-root.
NEWEST_FRONT_END = os.environ.get("ASDM_NEWEST_FRONT_END") or os.path.join(
    os.environ.get("ASDM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "asdm-comfyui"),
    "frontend-1.58.1", "comfyui_frontend_package", "static")
FRONT_ENDS = ["host", "newest"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


@pytest.fixture(scope="module", params=FRONT_ENDS)
def server(request, tmp_path_factory):
    """ComfyUI's own main.py on 127.0.0.1, the pack in a custom_nodes folder of its own, serving
    the host's front end or the newest one."""
    if request.param == "newest" and not os.path.isfile(os.path.join(NEWEST_FRONT_END, "index.html")):
        pytest.skip(f"the newest front end is not installed at {NEWEST_FRONT_END} (scripts/setup_browser.sh)")
    ckpt, unet = tm.random_sd15_checkpoint(), tm.random_bksdm_unet("base")
    work = tmp_path_factory.mktemp("comfy-server")
    os.makedirs(work / "custom_nodes")
    os.symlink(ROOT, work / "custom_nodes" / host.PACK_NAME)
    cache = tm.cache()
    (work / "paths.yaml").write_text(
        f"asdm_pack:\n  base_path: {work}\n  custom_nodes: custom_nodes\n"
        f"asdm_models:\n  base_path: {cache}\n  checkpoints: checkpoints\n  unet: unet\n"
        f"  diffusion_models: unet\n")
    os.makedirs(work / "cwd")
    # Auto Cache keeps its profiles in the server's user directory (the host's own, the one this
    # process sees); the ones this run writes are removed afterwards, so every run calibrates.
    profiles = os.path.join(compat.user_directory(), *autocache.PROFILE_FOLDER)
    kept = set(os.listdir(profiles)) if os.path.isdir(profiles) else set()
    port = _free_port()
    log = open(work / "server.log", "w")
    cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--cpu",
           "--disable-auto-launch", "--extra-model-paths-config", str(work / "paths.yaml"),
           "--output-directory", str(work / "output"), "--input-directory", str(work / "input"),
           "--temp-directory", str(work)]
    if request.param == "newest":
        cmd += ["--front-end-root", NEWEST_FRONT_END]
    cmd[1] = os.path.join(compat.host_path(), "main.py")
    proc = subprocess.Popen(cmd, cwd=work / "cwd", stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({proc.returncode}):\n" + (work / "server.log").read_text()[-3000:])
            try:
                get_json(url + "/object_info/ASDMFeatureInheritance", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("ComfyUI did not answer within 180 s:\n" + (work / "server.log").read_text()[-3000:])
                time.sleep(1)
        shots = SHOTS if request.param == "host" else os.path.join(SHOTS, "newest-front-end")
        yield {"url": url, "ckpt": ckpt, "unet": unet, "log": work / "server.log", "shots": shots,
               "front_end": request.param}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        for name in (set(os.listdir(profiles)) if os.path.isdir(profiles) else set()) - kept:
            os.remove(os.path.join(profiles, name))


def close_dialogs(pg):
    """The front end opens its template browser over the canvas on the first visit (it may
    appear some seconds after the page is ready on a busy machine); Escape closes it, else its
    close button. Bounded: 30 s."""
    quiet = 0
    for _ in range(60):
        pg.wait_for_timeout(500)
        mask = pg.locator(".p-dialog-mask")
        if mask.count() == 0:
            quiet += 1
            if quiet >= 6:
                return
            continue
        quiet = 0
        pg.keyboard.press("Escape")
        close = pg.locator(".p-dialog-mask .p-dialog-close-button, .p-dialog-mask button[aria-label='Close']")
        if mask.count() and close.count():
            close.first.click()
    if pg.locator(".p-dialog-mask").count():
        os.makedirs(SHOTS, exist_ok=True)
        pg.screenshot(path=os.path.join(SHOTS, "dialog.png"))
        text = pg.locator(".p-dialog-mask").first.inner_text()[:500]
        raise AssertionError(f"a dialog stays open over the canvas: {text!r}")


@pytest.fixture(scope="module")
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1600, "height": 1000})
            pg.set_default_timeout(60_000)
            pg.goto(server["url"])
            pg.wait_for_function("window.app && window.app.graph && window.LiteGraph && "
                                 "'ASDMFeatureInheritance' in LiteGraph.registered_node_types", timeout=120_000)
            close_dialogs(pg)
            pg.evaluate("""async () => {
                const {api} = await import('/scripts/api.js');
                window.__asdm_errors = [];
                api.addEventListener('execution_error', e => window.__asdm_errors.push(e.detail));
            }""")
            yield pg
        finally:
            browser.close()


@pytest.fixture(scope="module")
def object_info(server):
    return get_json(server["url"] + "/object_info", timeout=60)


def widget_inputs(info: dict) -> list[str]:
    """Input names the front end shows as widgets, in its order."""
    return [name for sec in ("required", "optional")
            for name, spec in info["input"].get(sec, {}).items() if graphs.is_widget(spec[0])]


def save_thumbnail(page, clip, path):
    """The template browser's card image: the graph's part of the page, scaled down, as JPEG."""
    import io
    from PIL import Image
    img = Image.open(io.BytesIO(page.screenshot(type="png", clip=clip))).convert("RGB")
    img = img.resize((THUMB_WIDTH, round(img.height * THUMB_WIDTH / img.width)), Image.LANCZOS)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, "JPEG", quality=85, optimize=True)


def test_every_asdm_input_has_a_tooltip(object_info):
    ours = {k: v for k, v in object_info.items() if k.startswith("ASDM")}
    assert len(ours) >= 6
    for name, info in ours.items():
        assert info["category"].startswith("A-SDM/") and info["description"], name
        for sec in ("required", "optional"):
            for inp, spec in info["input"].get(sec, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip"), f"{name}.{inp} has no tooltip"


def test_new_nodes_show_their_widgets_with_defaults(page, object_info):
    for name, info in object_info.items():
        if not name.startswith("ASDM"):
            continue
        got = page.evaluate("""(t) => { const n = LiteGraph.createNode(t);
            return (n.widgets || []).filter(w => w.name !== 'control_after_generate')
                .map(w => [w.name, w.value, !!(w.options && w.options.advanced)]); }""", name)
        advanced = [g.pop() for g in got]
        want = []
        for w in widget_inputs(info):
            spec = info["input"].get("required", {}).get(w) or info["input"]["optional"][w]
            opts = spec[1] if len(spec) > 1 else {}
            listed = graphs.choices(spec[0], opts)   # a combo: V1's list, or V3's ("COMBO", {"options": [...]})
            default = opts["default"] if "default" in opts else (listed[0] if listed else None)
            want.append([w, default])
        assert got == want, name
        # the inputs a typical user does not change reach the widgets as advanced (0.3.64's front
        # end keeps it in the widget's options but still draws the widget: folding came later)
        assert advanced == [bool((info["input"].get("required", {}).get(w) or info["input"]["optional"][w])[1].get("advanced"))
                                for w in widget_inputs(info)], name


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_graph_loads_renders_and_runs(page, server, object_info, name):
    ui = graphs.load_ui_workflow(name)
    api = graphs.load_api_workflow(name)
    loaded = page.evaluate("""async (g) => {
        await app.loadGraphData(g);
        // the whole graph in view: scale and offset to its bounding box (titles sit above pos)
        const ns = app.graph._nodes, el = app.canvas.canvas;
        const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - 30));
        const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
        const w = el.clientWidth || el.width, h = el.clientHeight || el.height;
        const s = Math.min(1, (w - 160) / (x1 - x0), (h - 120) / (y1 - y0));
        app.canvas.ds.scale = s; app.canvas.ds.offset = [80 / s - x0, 60 / s - y0];
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        const r = el.getBoundingClientRect();   // the graph's box on the page, for the thumbnail
        const clip = {x: r.left + 70, y: r.top + 50, width: (x1 - x0) * s + 20, height: (y1 - y0) * s + 20};
        const missing = g.nodes.filter(n => !(n.type in LiteGraph.registered_node_types)).map(n => n.type);
        return {missing, clip, nodes: app.graph._nodes.map(n => ({id: n.id, type: n.type,
            widgets: (n.widgets || []).filter(w => w.name !== 'control_after_generate').map(w => [w.name, w.value])}))};
    }""", ui)
    assert loaded["missing"] == []
    notes = [n for n in loaded["nodes"] if n["type"] == graphs.NOTE]
    assert [[w[1] for w in n["widgets"]] for n in notes] == [[graphs.NOTES[name]]]
    loaded["nodes"] = [n for n in loaded["nodes"] if n["type"] != graphs.NOTE]
    assert sorted(int(n["id"]) for n in loaded["nodes"]) == sorted(int(k) for k in api)   # newer front ends: string ids
    for n in loaded["nodes"]:
        inputs = api[str(n["id"])]["inputs"]
        info = object_info[n["type"]]
        # the graph's inputs all exist in the served definition (a renamed input fails here) ...
        known = set(info["input"].get("required", {})) | set(info["input"].get("optional", {}))
        assert set(inputs) <= known, (n["type"], set(inputs) - known)
        # ... and each widget the page shows holds the graph's value
        names = widget_inputs(info)
        assert [w[0] for w in n["widgets"]] == names, n["type"]
        for wname, value in n["widgets"]:
            if wname in inputs:
                assert value == inputs[wname], (n["type"], wname, value, inputs[wname])
    os.makedirs(server["shots"], exist_ok=True)
    page.screenshot(path=os.path.join(server["shots"], name.replace(".json", ".png")))
    if server["front_end"] == "host":   # the bundled thumbnails are the host front end's
        save_thumbnail(page, loaded["clip"], os.path.join(THUMBS, name.replace(".json", ".jpg")))

    # Queue it from the page, shrunk to what this CPU runs quickly, on the project-made models.
    # The SDXL graphs queue on the SD1.5 ones (SDXL through the checkpoint, BK-SDM Base in SSD-1B's
    # place): a project-made SDXL checkpoint would need SDXL's two text encoders, 0.8 B parameters,
    # and a UNet of SDXL's full width. What this checks of them is the page's part: the prompt it
    # builds from the saved widgets, the server's validation and a run of their A-SDM nodes;
    # tests/host/test_workflows.py samples them on SDXL-topology UNets.
    small = {"ckpt_name": server["ckpt"], "unet_name": server["unet"], "width": 64, "height": 64,
             "steps": 2, "end_1": 1, "start_2": 1}
    if any(n["class_type"] == "ASDMLoadEmbeddedModel" for n in api.values()):
        del small["unet_name"]   # the embedded model's own family ships with the pack
    page.evaluate("""(v) => { for (const n of app.graph._nodes) for (const w of (n.widgets || []))
        if (w.name in v) w.value = v[w.name]; }""", small)
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as resp:
        page.evaluate("app.queuePrompt(0, 1)")
    body = resp.value.json()
    assert "prompt_id" in body, body
    deadline = time.time() + 300
    while True:
        try:
            hist = get_json(f"{server['url']}/history/{body['prompt_id']}")
        except OSError:   # a server busy sampling may answer late; ask again until the deadline
            hist = {}
        if body["prompt_id"] in hist:
            break
        assert time.time() < deadline, "the queued graph did not finish within 300 s"
        time.sleep(1)
    status = hist[body["prompt_id"]].get("status", {})
    assert status.get("status_str") == "success", status
    assert page.evaluate("window.__asdm_errors") == []


# Graphs saved with earlier versions of the nodes whose inputs changed, written as the front end
# saved them (UI format: widget values by position), and the settings each must queue with.
MODEL_IN = [{"name": "model", "type": "MODEL", "link": None}]
SWITCH_IN = [{"name": f"model_{i}", "type": "MODEL", "link": None} for i in range(1, 5)]
SAVED_GRAPHS = {
    # before reuse / forecast existed (4 values): residual reuse, no forecast, as it ran then
    "inheritance-4-values": ("ASDMFeatureInheritance", MODEL_IN, ["CO6", "", 5, 0.2], dict(
        preset="CO6", units="", period=5, final_full_steps=0.2, reuse="residual", forecast=False,
        features_on="compute")),
    # the first version: final_full_steps an integer count of steps
    "inheritance-4-values-count": ("ASDMFeatureInheritance", MODEL_IN, ["LI1", "dn0", 2, 10], dict(
        preset="LI1", units="dn0", period=2, final_full_steps=10, reuse="residual", forecast=False,
        features_on="compute")),
    # with reuse / forecast (6 values), as saved by the version before this node was deprecated
    "inheritance-6-values": ("ASDMFeatureInheritance", MODEL_IN, ["EX3", "", 3, 0, "output", True], dict(
        preset="EX3", units="", period=3, final_full_steps=0, reuse="output", forecast=True,
        features_on="compute")),
    "inheritance-6-values-residual": ("ASDMFeatureInheritance", MODEL_IN,
                                      ["CO6", "up3.*.A", 5, 0.2, "residual", True], dict(
        preset="CO6", units="up3.*.A", period=5, final_full_steps=0.2, reuse="residual", forecast=True,
        features_on="compute")),
    # ME-CondConv saved with the front end's control_after_generate value after seed
    "condconv-with-control-value": ("ASDMMECondConv", MODEL_IN + [{"name": "teacher", "type": "MODEL", "link": None}],
                                    ["none", "dn0, up3", 3, "paper", 1234, "randomize"], dict(
        weights="none", units="dn0, up3", experts=3, init="paper", seed=1234)),
    "condconv-without-control-value": ("ASDMMECondConv", MODEL_IN + [{"name": "teacher", "type": "MODEL", "link": None}],
                                       ["none", "dn*.*.R", 2, "identity", 77], dict(
        weights="none", units="dn*.*.R", experts=2, init="identity", seed=77)),
    # the switch in fractions: 0.4 stays 0.4 (its step used to be 1: shown as 0, rounded to 0 on edit)
    "switch-fractions": ("ASDMUNetSwitch", SWITCH_IN, ["fraction", 0, 0.4, 0.4, 0.75, 0.75, -1, 0, -1], dict(
        unit="fraction", start_1=0, end_1=0.4, start_2=0.4, end_2=0.75, start_3=0.75, end_3=-1,
        start_4=0, end_4=-1)),
}


@pytest.mark.parametrize("case", sorted(SAVED_GRAPHS))
def test_saved_graphs_keep_their_settings(page, case):
    """A UI-format graph saved with an earlier layout of a node loads with the settings it was saved
    with: the widgets read back, and the prompt the front end queues (app.graphToPrompt), hold the
    saved values; widgets the graph had no value for hold what the graph meant then."""
    node_type, inputs, values, want = SAVED_GRAPHS[case]
    graph = {"last_node_id": 1, "last_link_id": 0, "links": [], "groups": [], "config": {}, "extra": {},
             "version": 0.4, "nodes": [{
                 "id": 1, "type": node_type, "pos": [100, 100], "size": [340, 260], "flags": {}, "order": 0,
                 "mode": 0, "inputs": inputs, "outputs": [{"name": "model", "type": "MODEL", "links": []}],
                 "properties": {"Node name for S&R": node_type}, "widgets_values": values}]}
    got = page.evaluate("""async (g) => {
        await app.loadGraphData(g);
        const n = app.graph._nodes[0];
        const widgets = Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]));
        const queued = (await app.graphToPrompt()).output;
        const end = (n.widgets || []).find(w => w.name === 'end_1');
        let edited = null, precision = null;
        if (end) {   // a user types 0.4: the widget's own callback rounds the value it is given
            end.value = 0.4; end.callback.call(end, 0.4);
            edited = end.value; precision = end.options.precision;
        }
        return {widgets, queued: queued['1'] ? queued['1'].inputs : null, edited, precision};
    }""", graph)
    assert got["queued"] == want, case
    shown = {k: v for k, v in got["widgets"].items() if k != "control_after_generate"}
    assert shown == want, case
    if node_type == "ASDMMECondConv":
        # its seed is not a sampling seed: the front end adds no randomize widget
        assert "control_after_generate" not in got["widgets"]
    if node_type == "ASDMUNetSwitch":
        assert got["edited"] == 0.4 and got["precision"] >= 1, got
