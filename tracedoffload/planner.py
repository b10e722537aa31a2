GPU_TIERS: dict[str, int] = {}
