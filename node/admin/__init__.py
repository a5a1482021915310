"""Administration shared by every front end (CLI, console): AE titles and their C-ECHO (ae), and the
operations on instances and exports (service). Front ends parse and print; the behaviour lives here."""
