"""The dashboard's pages: the generic ones (every run) and the app pages, keyed by the `app` field of a run's
config.json. Each page module has `render()`; `dashboards/app.py` puts them in the navigation.

(Not `pages/`: Streamlit would take a `pages/` folder beside app.py for its old multipage scripts.)
To add an app page: write `views/<name>.py` with `APPS` (the app names it reads) and `render()`, and list it
in APP_PAGES; docs/dashboards.md documents the eval.json / rollouts fields each page reads.
"""

from dataclasses import dataclass
from types import ModuleType

from dashboards.views import curves, debias, math_page, public_goods, rollouts, runs, sudoku, tcm


@dataclass(frozen=True)
class PageSpec:
    module: ModuleType
    title: str
    url_path: str
    icon: str


GENERIC_PAGES = (
    PageSpec(runs, "Runs", "runs", ":material/folder_open:"),
    PageSpec(curves, "Training curves", "curves", ":material/show_chart:"),
    PageSpec(rollouts, "Rollouts", "rollouts", ":material/list:"),
)
APP_PAGES = (
    PageSpec(sudoku, "Sudoku", "sudoku", ":material/grid_on:"),
    PageSpec(public_goods, "Public goods", "public-goods", ":material/groups:"),
    PageSpec(debias, "De-bias", "debias", ":material/balance:"),
    PageSpec(math_page, "Math", "math", ":material/functions:"),
    PageSpec(tcm, "TCM", "tcm", ":material/local_pharmacy:"),
)


def page_for_app(app: str) -> PageSpec | None:
    """The app page that reads runs of `app` (its config.json `app` field), if any."""
    return next((spec for spec in APP_PAGES if app in spec.module.APPS), None)
