"""Classic service-mesh baselines that DPUmesh is compared against."""
