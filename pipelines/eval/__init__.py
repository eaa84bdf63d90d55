"""Evaluation of trained adapters: alignment metrics, LPIPS, identity, reports."""
