"""Regenerates the UI-format bundled graphs in example_workflows/ from their API twins in
example_workflows/api/, each with the Note that says what it shows (asdm/harness/graphs.py's
NOTES; the tests check that they agree):

    python scripts/make_workflows.py

Their thumbnails (example_workflows/<name>.jpg) and the screenshots in docs/screenshots come from
the browser test on current ComfyUI (docs/testing.md).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from asdm.harness import graphs, host  # noqa: E402


def main():
    host.boot()
    for name in graphs.bundled():
        with open(os.path.join(graphs.EXAMPLES, name), "w") as f:
            json.dump(graphs.ui_workflow(name), f, indent=1)
            f.write("\n")
        print("wrote example_workflows/" + name)


if __name__ == "__main__":
    main()
