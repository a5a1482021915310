"""Study-level triage: group a study's analysed images, decide a level, and queue its alerts.

``rules`` decides (pure, no I/O), ``study`` gathers what the audit log knows about a study, ``engine``
runs the loop that finds stable studies and records each decision with its alerts in one transaction.
"""
