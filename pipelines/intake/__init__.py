"""Photo intake: raw uploads -> clean, labelled training set (issue 3)."""
