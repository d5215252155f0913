"""The one exception type users see: a one-line message naming the bad value and what is allowed."""


class CvaeError(Exception):
    """A problem the user can fix (bad config, bad data, missing or corrupted file)."""
