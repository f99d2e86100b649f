"""How the MLflow extras find the ``MLFlowHandler`` that ``--tracking mlflow`` adds, through public APIs only."""

from __future__ import annotations

from ignite.engine import Engine
from monai.handlers import MLFlowHandler, StatsHandler

from monai_mdm.handlers import MLflowLink, mlflow_handlers, with_mlflow_link


def _engine_with(handlers: list) -> Engine:
    engine = Engine(lambda e, b: None)
    for handler in handlers:
        handler.attach(engine)
    return engine


def test_the_link_finds_the_mlflow_handlers_of_its_own_engine_only(tmp_path):
    tracker = MLFlowHandler(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    stats = StatsHandler()
    linked = with_mlflow_link([stats, tracker])
    assert linked[:2] == [stats, tracker] and isinstance(linked[2], MLflowLink)
    engine = _engine_with(linked)
    assert mlflow_handlers(engine) == [tracker]
    # another engine, or one whose list did not pass through the link, has none
    assert mlflow_handlers(_engine_with([StatsHandler()])) == []


def test_without_tracking_the_link_finds_nothing_and_keeps_the_list():
    stats = StatsHandler()
    linked = with_mlflow_link([stats, None])
    assert linked[:2] == [stats, None]
    assert mlflow_handlers(_engine_with([stats, linked[2]])) == []
    assert isinstance(with_mlflow_link(None)[0], MLflowLink)
