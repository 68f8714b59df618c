"""A buyer's commission from the marketplace, run by whichever worker takes it (team mode).

When ``Settings.commission_deployment`` names this flow's deployment (``buyer-commission`` in
prefect.yaml), the marketplace's commission desk (:class:`marketplace.commission_desk.
CommissionDesk`) uploads the buyer's checked folder (``spec.yaml`` and the data file) and the
marketplace's base model to the object store as content-addressed trees (:mod:`infra.line_io`)
and submits one run of this flow with the two hashes. The worker fetches both into its own
home (every file checked against its hash; the base once per machine) and runs the commission
there: its only data root is the fetched folder, its base the fetched tree. Nothing but the
object store, the commission store and the library (the team's S3, PostgreSQL and MLflow
server) is shared with the marketplace, whose account page follows the commission's state in
the commission store, as with the local runner.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.commission import commission_flow
from infra import line_io
from infra.settings import get_settings
from infra.storage import open_store
from tasks.summary import CommissionSummary


@flow(name="buyer-commission", flow_run_name="buyer commission {upload_tree:.12}")
def buyer_commission_flow(upload_tree: str, base_tree: str) -> CommissionSummary:
    """Fetches the upload and base trees, then runs :func:`flows.commission.commission_flow`."""
    settings = get_settings()
    store = open_store(settings.objects_url, settings.s3_endpoint_url)
    folder = line_io.cached_tree(store, upload_tree, settings.home / "marketplace" / "inbound")
    base = line_io.cached_tree(store, base_tree, settings.home / "line-cache")
    get_run_logger().info("buyer upload %s and base %s fetched", upload_tree[:12], base_tree[:12])
    local = settings.model_copy(update={"data_roots": [folder], "base_model_dir": base})
    return commission_flow(str(folder / "spec.yaml"), settings=local)
