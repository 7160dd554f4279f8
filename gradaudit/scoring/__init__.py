"""Scoring reconstructions: metrics, the `AuditResult`, and auditing a batch or saved snapshots."""
