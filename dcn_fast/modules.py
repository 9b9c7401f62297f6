class SRFConv2d: pass
