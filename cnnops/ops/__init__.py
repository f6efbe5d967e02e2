"""Public op functions; importing a module here registers its fake kernel and autograd formula."""
