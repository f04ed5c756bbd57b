"""The Streamlit entry of the dashboards: navigation over the generic pages and the app pages.

Start it with `grpo-suite dashboard serve --runs DIR` (which runs `streamlit run dashboards/app.py` with
GRPO_SUITE_RUNS=DIR), or directly: `GRPO_SUITE_RUNS=runs streamlit run dashboards/app.py`.
"""

import streamlit as st

from dashboards import state
from dashboards.views import APP_PAGES, GENERIC_PAGES


def main() -> None:
    st.set_page_config(page_title="grpo-suite runs", layout="wide")

    def page(spec, default: bool = False) -> st.Page:
        return st.Page(
            spec.module.render, title=spec.title, url_path=spec.url_path, icon=spec.icon, default=default
        )

    navigation = st.navigation(
        {
            "Runs": [page(spec, default=i == 0) for i, spec in enumerate(GENERIC_PAGES)],
            "Apps": [page(spec) for spec in APP_PAGES],
        }
    )
    st.sidebar.caption("runs folder")
    st.sidebar.code(str(state.runs_root()), language=None)
    navigation.run()


main()
