"""Preference tuning: DPO and its relatives (losses, the pair step, reference policies, reward models)."""
