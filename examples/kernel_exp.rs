//! Experiment: time one conv kernel variant from a WGSL file.
use hesscope::gpu::kernels::{params, Kernel};
use hesscope::gpu::{BackendChoice, GpuContext};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let src = std::fs::read_to_string(&a[1])?;
    let entry = a[2].clone();
    let trusted = a.get(3).is_some_and(|s| s == "trusted");
    let per_thread: usize = a.get(4).map(|s| s.parse().unwrap()).unwrap_or(1);
    let ctx = GpuContext::open(BackendChoice::Vulkan, 0)?;
    let (n, cin, h, w, cout, k, s, pad) = (
        32usize, 16usize, 32usize, 32usize, 16usize, 3usize, 1usize, 1usize,
    );
    let (oh, ow) = (32usize, 32usize);
    let x = ctx.storage("x", n * cin * h * w)?;
    let wt = ctx.storage("w", cout * cin * k * k)?;
    let y = ctx.storage("y", n * cout * oh * ow)?;
    ctx.write_f32(&x, 0, &vec![0.5f32; n * cin * h * w])?;
    ctx.write_f32(&wt, 0, &vec![0.25f32; cout * cin * k * k])?;
    let module = if trusted {
        unsafe {
            ctx.device.create_shader_module_trusted(
                wgpu::ShaderModuleDescriptor {
                    label: None,
                    source: wgpu::ShaderSource::Wgsl(src.into()),
                },
                wgpu::ShaderRuntimeChecks::unchecked(),
            )
        }
    } else {
        ctx.device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: None,
                source: wgpu::ShaderSource::Wgsl(src.into()),
            })
    };
    let reg = ctx.pipeline(Kernel::ConvForward)?;
    let pl = ctx
        .device
        .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: None,
            bind_group_layouts: &[Some(&reg.layout)],
            immediate_size: 0,
        });
    let pipe = ctx
        .device
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: None,
            layout: Some(&pl),
            module: &module,
            entry_point: Some(&entry),
            compilation_options: Default::default(),
            cache: None,
        });
    let p = params(&[
        n as u32,
        cin as u32,
        h as u32,
        w as u32,
        cout as u32,
        k as u32,
        s as u32,
        pad as u32,
        oh as u32,
        ow as u32,
        0,
        0,
        0,
        0,
    ]);
    let ub = ctx.uniform("p", bytemuck::cast_slice(&p))?;
    let layout = reg.layout.clone();
    let bufs = [&ub, &x.buffer, &wt.buffer, &x.buffer, &wt.buffer, &y.buffer];
    let entries: Vec<_> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: b.as_entire_binding(),
        })
        .collect();
    let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &layout,
        entries: &entries,
    });
    let total = n * cout * oh * ow / per_thread;
    let groups = total.div_ceil(256) as u32;
    for rep in 0..3 {
        let t = Instant::now();
        let mut enc = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipe);
            pass.set_bind_group(0, &bg, &[]);
            if entry == "v_uni" {
                pass.dispatch_workgroups(
                    ((n * oh * ow) as u32).div_ceil(256),
                    (cout / 8) as u32,
                    1,
                );
            } else {
                pass.dispatch_workgroups(groups, 1, 1);
            }
        }
        ctx.queue.submit([enc.finish()]);
        ctx.wait()?;
        let secs = t.elapsed().as_secs_f64();
        let macs = (n * cout * oh * ow * cin * k * k) as f64;
        let r = ctx.read_f32(&[(&y, 0, 4)])?;
        println!(
            "{entry} trusted={trusted} rep {rep}: {secs:.3} s, {:.2} GFLOP/s, y0={}",
            2.0 * macs / secs / 1e9,
            r[0][0]
        );
    }
    let _ = Kernel::ConvForward;
    Ok(())
}
