# Vitis HLS Tcl flow for qc_mlp on xc7z020clg400-1:  vitis-run --mode hls --tcl run_hls.tcl
# (or vitis_hls -f run_hls.tcl with older tools). Steps: csim, csynth, cosim, export.
open_project -reset qc_mlp_prj
set_top qc_mlp
add_files qc_mlp.cpp
add_files -tb qc_mlp_tb.cpp
add_files -tb tb_data
open_solution -reset solution1 -flow_target vivado
set_part xc7z020clg400-1
create_clock -period 10.0 -name default
csim_design -argv "tb_data/inputs.bin 4 tb_data/outputs.bin tb_data/expected.bin"
csynth_design
cosim_design -argv "tb_data/inputs.bin 4 tb_data/outputs.bin tb_data/expected.bin"
export_design -format ip_catalog
exit
