"""Regenerates the UI-format example graphs in workflows/ from their API twins in
workflows/api/ (the tests check that they agree):

    python scripts/make_workflows.py
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm.harness import graphs, host  # noqa: E402


def main():
    host.boot()
    api_dir = os.path.join(host.REPO_ROOT, "workflows", "api")
    for name in sorted(os.listdir(api_dir)):
        if name.endswith(".json"):
            ui = graphs.api_to_ui(graphs.load_api_workflow(name))
            with open(os.path.join(host.REPO_ROOT, "workflows", name), "w") as f:
                json.dump(ui, f, indent=1)
                f.write("\n")
            print("wrote workflows/" + name)


if __name__ == "__main__":
    main()
