"""Environments shipped with agentrl (one short file each)."""
