"""Delivery backends behind one small interface (`base.Deliverer`)."""
