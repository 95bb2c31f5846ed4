"""Baseline editors that the installed EasyEdit lacks, built on its own machinery (see ``alphaedit``)."""
