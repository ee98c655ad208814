"""The MLflow UI view a search opens on: its trials as a table with their F1 and searched parameters, and a
chart of validation F1 per epoch, without clicks or column picking.

Why an experiment tag: MLflow 3's runs page keeps its columns, sort and charts in the browser, so a fresh
browser shows a collapsed parent run and default columns. Its "shared view" feature reads the same state
from the experiment tag ``mlflow.sharedViewState.<key>`` when the page's URL carries
``viewStateShareKey=<key>``; foldtune writes that tag when a search starts and prints links with the key
(``foldtune ui``). The state is MLflow's own JSON (the UI's ``selectedColumns``, ``orderByKey``, chart
sections and cards); checked against MLflow 3.17's UI by the slow UI test (tests/test_ui.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from orchestrator.tracking.store import SearchTracking

VIEW_KEY = "foldtune"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
MODEL_TRAINING_QUERY = "?workflowType=machine_learning"  # MLflow 3.17: training pages, not GenAI's
METRIC_COLUMNS = ("best_f1", "val_f1")  # each trial's best and latest mean validation macro F1
CHART_SECTION = "foldtune-f1"


def search_view(searched: Iterable[str]) -> dict:
    """The view state: trials sorted by best F1 with the ``searched`` parameters as columns, and a chart
    section with validation F1 per epoch (one line per trial) and the best F1 so far."""
    columns = [f"metrics.`{name}`" for name in METRIC_COLUMNS] + [f"params.`{name}`" for name in searched]
    charts = [
        {
            "uuid": f"{CHART_SECTION}-{metric}",
            "type": "LINE",
            "metricSectionId": CHART_SECTION,
            "deleted": False,
            "isGenerated": True,
            "metricKey": metric,
            "selectedMetricKeys": [metric],
            "xAxisKey": "step",
            "scaleType": "linear",
            "lineSmoothness": 0,
            "runsCountToCompare": 100,
            "displayPoints": True,
        }
        for metric in ("val_f1", "best_f1")
    ]
    return {
        "selectedColumns": columns,
        "orderByKey": f"metrics.`{METRIC_COLUMNS[0]}`",
        "orderByAsc": False,
        "compareRunSections": [
            {
                "uuid": CHART_SECTION,
                "name": "foldtune: validation F1 per epoch",
                "display": True,
                "isReordered": True,
            }
        ],
        "compareRunCharts": charts,
        "isAccordionReordered": True,  # our section first, MLflow's generated ones after it
    }


def write_search_view(tracking: SearchTracking, searched: Iterable[str]) -> None:
    tracking.client.set_experiment_tag(tracking.experiment_id, VIEW_TAG, json.dumps(search_view(searched)))


def view_url(base: str, experiment_id: str, chart: bool = False) -> str:
    """The link to an experiment's runs page in foldtune's view (``chart``: its chart tab)."""
    query = f"{MODEL_TRAINING_QUERY}&viewStateShareKey={VIEW_KEY}" + (
        "&compareRunsMode=CHART" if chart else ""
    )
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs{query}"


def search_links(tracking_uri: str, base: str, limit: int = 10) -> list[tuple[str, str]]:
    """(experiment name, link in foldtune's view) for the experiments a search wrote, newest first."""
    client = SearchTracking(tracking_uri, "").client
    experiments = client.search_experiments(
        filter_string=f"tags.`{VIEW_TAG}` != ''", max_results=limit, order_by=["last_update_time DESC"]
    )
    return [(e.name, view_url(base, e.experiment_id)) for e in experiments]
