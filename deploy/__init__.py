"""edgefleet host side: publish, collect, select, assign, provision, fleet view, demo."""
