"""Multi-device training: the mesh and logical-axis shardings (`mesh`), GPipe layer-stage
pipelining of a `LanguageModel` (`gpipe`) and CoMeT's chunk-wavefront pipeline
(`comet_pipeline`, spec comet.md §10)."""

from dlax.parallel.comet_pipeline import (COMET_PIPELINE_RULES, comet_pipeline,
                                          comet_pipeline_loss, stage_loss_sums)
from dlax.parallel.gpipe import (gpipe_blocks, gpipe_forward, merge_microbatches,
                                 split_microbatches, stage_pipeline)
from dlax.parallel.mesh import (LOGICAL_AXIS_RULES, MESH_AXES, PARAM_AXES, batch_sharding,
                                logical_axes, logical_to_mesh, make_mesh, optimizer_shardings,
                                param_shardings)

__all__ = [
    # mesh and shardings
    "LOGICAL_AXIS_RULES", "MESH_AXES", "PARAM_AXES", "batch_sharding", "logical_axes",
    "logical_to_mesh", "make_mesh", "optimizer_shardings", "param_shardings",
    # GPipe
    "gpipe_blocks", "gpipe_forward", "merge_microbatches", "split_microbatches",
    "stage_pipeline",
    # CoMeT chunk wavefront
    "COMET_PIPELINE_RULES", "comet_pipeline", "comet_pipeline_loss", "stage_loss_sums",
]
